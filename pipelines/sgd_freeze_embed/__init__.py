from common.registry import register

register(
    "sgd_freeze_embed",
    description="Fine-tuning timm ViT / CLIP-style ViT / ConvNeXt with SGD, AdamW and SGD with the embedding frozen; ID/OOD/worst-group",
    module="pipelines.sgd_freeze_embed.module:FineTuneModule",
    datamodule="pipelines.sgd_freeze_embed.data:ShiftDataModule",
    demo_seconds=19,
)
