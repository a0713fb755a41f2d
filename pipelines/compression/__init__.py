from common.registry import register

register(
    "compression",
    description="Low-power deep learning survey: quantization, pruning, compact convolutions / low rank, NAS and KD on one trained baseline, one Pareto table",
    module="pipelines.compression.module:CompressionExperiment",
    demo_seconds=21,
)
