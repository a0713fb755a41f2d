from common.registry import register

register(
    "vocab_kd",
    description="Extreme LM compression: a 4,928-token student vocabulary, dual (mixed-vocabulary) training and shared projections",
    module="pipelines.vocab_kd.module:VocabKDModule",
    datamodule="pipelines.vocab_kd.data:TextDataModule",
    demo_seconds=20,
)
