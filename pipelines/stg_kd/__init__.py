from common.registry import register

register(
    "stg_kd",
    description="STG-KD: video captioning with a spatio-temporal object graph distilled into the scene branch; BLEU / METEOR / ROUGE-L / CIDEr-D",
    module="pipelines.stg_kd.module:STGKDModule",
    datamodule="pipelines.stg_kd.data:VideoCaptionDataModule",
    demo_seconds=14,
)
