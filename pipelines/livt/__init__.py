from common.registry import register

register(
    "livt",
    description="LiVT: ViTs from scratch on long-tailed data — MAE-style masked generative pretraining, then balanced-BCE fine-tuning",
    module="pipelines.livt.module:LiVTModule",
    datamodule="pipelines.livt.data:LTDataModule",
    demo_seconds=30,
)
