"""The CUDA backend's device checks, with torch.cuda mocked: no GPU is needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mpk.backends.cuda.executor import SMEM_BYTES, CudaDeviceError, check_device, wait_for_stream
from mpk.errors import RuntimeStallError


def fake_gpu(monkeypatch: pytest.MonkeyPatch, *, major: int = 9, minor: int = 0, sms: int = 132,
             smem: int = 227 * 1024, name: str = "NVIDIA H200") -> None:
    props = SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=sms, shared_memory_per_block_optin=smem)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)


def test_no_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(CudaDeviceError) as error:
        check_device(132)

    assert "no CUDA device" in str(error.value)
    assert "--backend cpu" in str(error.value)


def test_unsupported_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, major=7, minor=5, name="Tesla T4")

    with pytest.raises(CudaDeviceError) as error:
        check_device(40)

    assert "Tesla T4" in str(error.value)
    assert "7.5" in str(error.value)
    assert "9.0" in str(error.value)


def test_too_few_sms(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, sms=114, name="NVIDIA H100 PCIe")

    with pytest.raises(CudaDeviceError) as error:
        check_device(132)

    assert "132 workers" in str(error.value)
    assert "114 SMs" in str(error.value)
    assert "--workers 114" in str(error.value)


def test_too_little_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, major=8, minor=6, smem=SMEM_BYTES - 1024, name="NVIDIA RTX A6000")

    with pytest.raises(CudaDeviceError) as error:
        check_device(84)

    assert f"{SMEM_BYTES} bytes of shared memory" in str(error.value)
    assert f"{SMEM_BYTES - 1024}" in str(error.value)


@pytest.mark.parametrize(("major", "minor", "arch"), [(8, 0, "sm_80"), (9, 0, "sm_90a"), (10, 0, "sm_100a")])
def test_supported_devices_pick_architecture(monkeypatch: pytest.MonkeyPatch, major: int, minor: int, arch: str) -> None:
    fake_gpu(monkeypatch, major=major, minor=minor)

    chosen, _ = check_device(132)

    assert chosen == arch


def test_cli_reports_missing_device(qwen3_dir, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpk.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    code = main(["generate", str(qwen3_dir), "--prompt-ids", "1,2,3", "--backend", "cuda"])

    assert code == 2
    assert "no CUDA device" in capsys.readouterr().err


class FakeStream:
    """A CUDA stream whose work finishes after ``busy_polls`` queries, or never."""

    def __init__(self, busy_polls: int | None) -> None:
        self.busy_polls = busy_polls
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.busy_polls is not None and self.queries > self.busy_polls


class FakeClock:
    """Time that advances 10 ms per reading (a poll), and by the sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def test_stream_wait_returns_when_done() -> None:
    clock = FakeClock()
    stream = FakeStream(busy_polls=3)
    wait_for_stream(stream, 1.0, clock=clock, sleep=clock.sleep)
    assert stream.queries == 4
    assert clock.slept == 0.0, "a short wait spins and never sleeps"


def test_stream_wait_reports_stuck_task() -> None:
    clock = FakeClock()
    stream = FakeStream(busy_polls=None)
    with pytest.raises(RuntimeStallError, match="a task itself is stuck"):
        wait_for_stream(stream, 2.0, clock=clock, sleep=clock.sleep)
    assert clock.now > 2.0
    assert clock.slept > 0.0, "a long wait sleeps between polls"
