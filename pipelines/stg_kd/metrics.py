"""Caption scores with the COCO caption toolkit (pycocoevalcap), as the paper's table: BLEU-1…4, METEOR, ROUGE-L, CIDEr-D,
over a whole split at once (CIDEr-D's IDF comes from the evaluated references), after the toolkit's PTB tokeniser."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile


def java_available() -> bool:
    return shutil.which("java") is not None


@contextlib.contextmanager
def java_stderr_without_counts():
    """The toolkit's Java tokeniser inherits our stderr (the file descriptor, not sys.stderr) and prints a
    "PTBTokenizer tokenized N tokens" line on every call; that line is dropped, anything else Java says is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            rest = re.sub(r"PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.\n?", "", caught.read())
            if rest.strip():
                sys.stderr.write(rest)


def caption_scores(references: dict[str, list[str]], hypotheses: dict[str, str], meteor: bool = True) -> dict[str, float]:
    """``references``: video id → reference captions; ``hypotheses``: video id → one caption. With Java: PTB tokenisation
    and METEOR as the COCO toolkit; without it whitespace tokenisation of lower-cased text and no METEOR (the key is absent,
    never zero). An empty hypothesis scores as the token 'unk' (the scorers divide by its length)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(hypotheses):
        raise ValueError(f"{len(set(references) ^ set(hypotheses))} videos have references or a hypothesis but not both")
    java = java_available()
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()), java_stderr_without_counts():  # one Java start for both sides
            both = PTBTokenizer().tokenize(
                {
                    **{("ref", k): [{"caption": c} for c in v] for k, v in references.items()},
                    **{("hyp", k): [{"caption": h}] for k, h in hypotheses.items()},
                }
            )
        gts = {k: both[("ref", k)] for k in references}
        res = {k: both[("hyp", k)] for k in hypotheses}
    else:
        gts = {k: [" ".join(c.lower().split()) for c in v] for k, v in references.items()}
        res = {k: [" ".join(h.lower().split())] for k, h in hypotheses.items()}
    res = {k: v if v[0].strip() else ["unk"] for k, v in res.items()}
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor and java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:  # the jar runs until killed; its __del__ would do it at some later collection
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    return out
