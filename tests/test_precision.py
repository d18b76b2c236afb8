"""trainer.precision: what `auto` picks per device, and the refusals."""

from __future__ import annotations

import pytest
import torch

from cvt_train.engine.precision import autocast_dtype, precision_name
from cvt_train.errors import UserError

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "capability,auto", [((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_auto_on_gpus_old_and_new(capability, auto, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm_{capability[0]}{capability[1]}")
    assert autocast_dtype("auto", CUDA) is auto
    assert autocast_dtype("fp16", CUDA) is torch.float16 and autocast_dtype("fp32", CUDA) is None
    if auto is torch.float16:  # emulated bf16 is slow: refused, naming the GPU
        with pytest.raises(UserError, match=r"trainer.precision=bf16: GPU sm_70 has no native bf16"):
            autocast_dtype("bf16", CUDA)
    else:
        assert autocast_dtype("bf16", CUDA) is torch.bfloat16


@pytest.mark.parametrize("native_bf16,auto", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpus_with_and_without_native_bf16(native_bf16, auto, monkeypatch, caplog):
    """auto = bf16 only where the CPU multiplies bf16 in hardware (emulated, it ran at half fp32's speed); an explicit
    bf16 is kept either way, with one warning where it is emulated."""
    from cvt_train.engine import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    precision.warn_emulated_bf16_once.cache_clear()
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is auto
    with caplog.at_level("WARNING", logger="cvt_train.engine.precision"):
        names = [precision_name(autocast_dtype(p, cpu)) for p in ("bf16", "fp16", "fp32", "bf16")]
    assert names == ["bf16", "fp16", "fp32", "bf16"]
    warnings = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warnings) == (0 if native_bf16 else 1)
    precision.warn_emulated_bf16_once.cache_clear()


@pytest.mark.parametrize(
    "machine,avx512_bf16,amx,native",
    [
        ("x86_64", False, False, False),
        ("x86_64", True, False, True),
        ("x86_64", False, True, True),
        ("ppc64le", True, True, False),
    ],
)
def test_native_bf16_detection(machine, avx512_bf16, amx, native, monkeypatch):
    """AVX512_BF16 or AMX on x86 (Ice Lake has neither: the slow case); other non-Arm machines count as without."""
    import platform

    from cvt_train.engine import precision

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    precision.cpu_has_native_bf16.cache_clear()
    try:
        assert precision.cpu_has_native_bf16() is native
    finally:
        precision.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("validate_app", ["train", "eval", "bench"])
def test_unknown_precision_is_refused_by_each_apps_schema(validate_app):
    """The precision names are the schema's choices; each app's validate refuses another one in one line."""
    from omegaconf import OmegaConf

    from cvt_train.config import SCHEMAS, check_group

    cfg = OmegaConf.merge(OmegaConf.structured(SCHEMAS[validate_app]), {"trainer": {"precision": "fp8"}})
    with pytest.raises(
        UserError,
        match=r"^trainer.precision='fp8': unknown precision; choose one of bf16, fp16, "
        r"fp32, auto \(e.g. trainer.precision=bf16\)$",
    ):
        check_group(cfg, "trainer", OmegaConf.get_type(cfg, "trainer"))


@pytest.mark.parametrize("tf32", [True, False])
def test_gpu_defaults_set_tf32_and_benchmark_on_cuda_only(tf32, monkeypatch):
    """The switches are global flags, settable without a GPU: CUDA gets TF32 (or IEEE) and cuDNN's autotuner; a CPU
    run changes nothing."""
    from cvt_train.engine.precision import set_gpu_defaults

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark)
    try:
        matmul.fp32_precision = conv.fp32_precision = "none"
        torch.backends.cudnn.benchmark = False
        set_gpu_defaults(torch.device("cpu"), tf32=tf32)
        assert (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark) == ("none", "none", False)
        set_gpu_defaults(torch.device("cuda"), tf32=tf32, benchmark=True)
        expected = "tf32" if tf32 else "ieee"
        assert (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark) == (
            expected,
            expected,
            True,
        )
    finally:
        matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark = saved
