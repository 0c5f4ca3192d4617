"""The one reverse loop (`run`: run_chain, eps, the DeviceSteps protocol, Backend), its host-memory devices on one
settle base (`host`), its checks (`checks`), the engine-time counter (`timer`) and aligned per-step device tables
(`tables`)."""
