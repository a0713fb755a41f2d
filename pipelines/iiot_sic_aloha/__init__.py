from common.registry import register

register(
    "iiot_sic_aloha",
    description="SIC-assisted slotted ALOHA for IIoT: AoI, throughput, deadline violation (simulation + exact analysis)",
    module="pipelines.iiot_sic_aloha.module:SicAlohaExperiment",
    demo_seconds=5,
)
