"""``vllm.platforms.current_platform`` of the stand-in: a GPU platform, the kind that has sleep mode."""


class _GpuPlatform:
    device_name = "cuda (stand-in)"

    def is_sleep_mode_available(self) -> bool:
        return True

    def is_cpu(self) -> bool:
        return False


current_platform = _GpuPlatform()
