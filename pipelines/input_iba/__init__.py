from common.registry import register

register(
    "input_iba",
    description="InputIBA: fine-grained attribution with an input information bottleneck (feature IBA → WGAN prior → input IBA)",
    module="pipelines.input_iba.module:InputIBAExperiment",
    demo_seconds=28,
)
