"""minc_kernels.ops.configs.KernelConfig: the one type of every launch configuration."""
import copy
import pickle

import pytest
import torch

configs = pytest.importorskip("minc_kernels.ops.configs")
KernelConfig = configs.KernelConfig


def test_every_config_function_returns_a_kernel_config():
    f32 = torch.float32
    for for_device in (False, True):
        for cfg in (configs.rowmat_config(100, f32, gha=True, for_device=for_device, b=7),
                    configs.gram_config(33, torch.bfloat16, for_device=for_device),
                    configs.pairwise_config(300, 33, f32, for_device=for_device),
                    configs.colstats_config(1001, for_device=for_device),
                    configs.cross_gram_config(1001, f32, for_device=for_device)):
            assert type(cfg) is KernelConfig, cfg
    assert type(configs.rows_config(40)) is KernelConfig
    for k in (40, 300):  # one-pass and strip paths
        for on_gpu in (False, True):
            cfg = configs.pick_config(21, k, f32, on_gpu=on_gpu)
            assert type(cfg) is KernelConfig
            assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "ACC_IN_REGS", "num_warps", "num_stages",
                    "ROWS_BLOCK_R", "ROWS_BLOCK_K", "FINALIZE_NUM_WARPS", "n_splits", "strip_rows"} == set(cfg)


def test_mapping_splat_and_read_by_key():
    cfg = KernelConfig(BLOCK_M=64, BLOCK_K=32, num_warps=8)

    def launch(**kw):
        return kw

    assert launch(**cfg) == {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8}
    assert cfg["BLOCK_K"] == 32 and len(cfg) == 3
    assert list(cfg) == ["BLOCK_M", "BLOCK_K", "num_warps"]
    assert cfg == {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 8}
    assert "BLOCK_N" not in cfg and cfg.get("BLOCK_N") is None
    with pytest.raises(KeyError, match="'BLOCK_N' is not a parameter.*BLOCK_M, BLOCK_K, num_warps"):
        cfg["BLOCK_N"]


def test_read_only_and_replace_returns_a_new_one():
    cfg = KernelConfig(BLOCK_M=64, num_stages=3)
    new = cfg.replace(BLOCK_M=32)
    assert new == KernelConfig(BLOCK_M=32, num_stages=3) and cfg["BLOCK_M"] == 64
    with pytest.raises(TypeError, match="no parameter 'BLOCK_X' to replace"):
        cfg.replace(BLOCK_X=16)
    with pytest.raises(AttributeError, match="read-only"):
        cfg.BLOCK_M = 16
    with pytest.raises(TypeError):
        cfg["BLOCK_M"] = 16  # no __setitem__
    with pytest.raises(TypeError, match="BLOCK_M must be an int or a bool, got float"):
        KernelConfig(BLOCK_M=16.0)
    with pytest.raises(TypeError, match="num_warps must be an int"):
        KernelConfig(num_warps=None)


def test_hashable_and_picklable():
    a = KernelConfig(BLOCK_M=64, ACC_IN_REGS=True)
    b = KernelConfig(BLOCK_M=64, ACC_IN_REGS=True)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != a.replace(ACC_IN_REGS=False)
    for c in (pickle.loads(pickle.dumps(a)), copy.copy(a), copy.deepcopy(a)):
        assert type(c) is KernelConfig and c == a and hash(c) == hash(a)

