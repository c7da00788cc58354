"""Hugging Face checkpoints: foldmesh's logits equal transformers' on the same weights, saving
round-trips bit-exactly in the Hub format, errors name the tensor or setting, and sharded
parameters read only their own slices.

Tiny random models of each family are built and saved by transformers itself (no download).
"""

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, replace

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import foldmesh.hf._load as hf_load  # noqa: E402
from foldmesh.hf import (  # noqa: E402
    CheckpointError,
    config_from_hf,
    from_pretrained,
    hf_config_from,
    infer_architecture,
    load_hf_weights,
    save_pretrained,
)
from foldmesh.models import PRESETS, Transformer  # noqa: E402
from foldmesh.testing import RankPool  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2)
QWEN = dict(intermediate_size=48, moe_intermediate_size=8, num_experts=8)
CASES = {
    "mixtral": ("mixtral", "MixtralForCausalLM", dict(intermediate_size=16, num_local_experts=4)),
    "qwen2": ("qwen2_moe", "Qwen2MoeForCausalLM",
              dict(QWEN, shared_expert_intermediate_size=16, mlp_only_layers=[0])),
    # layers 0 and 2 dense by the sparse step, no qkv bias
    "qwen2-step": ("qwen2_moe", "Qwen2MoeForCausalLM",
                   dict(QWEN, shared_expert_intermediate_size=16, decoder_sparse_step=2,
                        qkv_bias=False)),
    "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM", dict(QWEN, head_dim=16, norm_topk_prob=True)),
    "qwen3-tied": ("qwen3_moe", "Qwen3MoeForCausalLM",
                   dict(QWEN, head_dim=8, norm_topk_prob=True, tie_word_embeddings=True,
                        mlp_only_layers=[1])),
    # YaRN: a blended pair range inside head_dim 16 (theta 100, original context 64), and
    # DeepSeek's two-term magnitude; and the magnitude from the factor alone
    "qwen3-yarn": ("qwen3_moe", "Qwen3MoeForCausalLM",
                   dict(QWEN, head_dim=16, norm_topk_prob=True, max_position_embeddings=256,
                        rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=4.0,
                                             original_max_position_embeddings=64,
                                             beta_fast=8.0, beta_slow=0.5, mscale=1.0,
                                             mscale_all_dim=0.5))),
    "mixtral-yarn": ("mixtral", "MixtralForCausalLM",
                     dict(intermediate_size=16, num_local_experts=4, head_dim=8,
                          max_position_embeddings=128,
                          rope_parameters=dict(rope_type="yarn", rope_theta=50.0, factor=2.0,
                                               original_max_position_embeddings=64))),
}
TOL = dict(atol=1e-5, rtol=1e-4)


def build_hf(kind, **overrides):
    """A random fp32 transformers model; norms ~ 1 + noise so that swapped norms show."""
    model_type, arch, extra = CASES[kind]
    cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.ndim == 1 and not name.endswith("bias")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if norm else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """kind -> (directory saved by transformers, the transformers model)."""
    made = {}

    def get(kind):
        if kind not in made:
            model = build_hf(kind)
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path)
            made[kind] = path, model
        return made[kind]

    return get


def input_ids(vocab=64):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def read_all(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(f))
    return out


# ------------------------------------------------------------------------ numerics, round trip
@pytest.mark.parametrize("kind", CASES)
def test_logits_match_transformers(hf_checkpoint, kind):
    path, hf = hf_checkpoint(kind)
    model = from_pretrained(path)
    assert model.hf_architecture == CASES[kind][1]
    with torch.no_grad():
        got = model(input_ids())
    torch.testing.assert_close(got, hf_logits(hf, input_ids()), **TOL)


@pytest.mark.parametrize("kind", CASES)
def test_save_round_trip_is_exact(hf_checkpoint, tmp_path, kind):
    path, hf = hf_checkpoint(kind)
    save_pretrained(from_pretrained(path), tmp_path / "out")
    ours, theirs = read_all(tmp_path / "out"), read_all(path)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    assert type(back).__name__ == CASES[kind][1]
    torch.testing.assert_close(hf_logits(back.eval(), input_ids()),
                               hf_logits(hf, input_ids()), **TOL)


def test_sharded_save_loads_back(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("qwen2")
    model = from_pretrained(path)
    out = tmp_path / "out"
    save_pretrained(model, out, max_shard_bytes=16 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read_all(out).values())
    again = from_pretrained(out)
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    # the loader alone, into a model built and initialised by hand
    fresh = Transformer(model.config)
    load_hf_weights(fresh, out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values(), strict=True))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(hf_logits(back.eval(), input_ids()),
                               hf_logits(hf, input_ids()), **TOL)


def test_save_replaces_directory_keeping_other_files(hf_checkpoint, tmp_path):
    model = from_pretrained(hf_checkpoint("mixtral")[0])
    out = tmp_path / "out"
    save_pretrained(model, out)
    (out / "tokenizer.json").write_text("{}")
    save_pretrained(model, out, max_shard_bytes=16 * 1024)  # now sharded
    names = {p.name for p in out.iterdir()}
    assert "tokenizer.json" in names and "model.safetensors" not in names
    assert "model.safetensors.index.json" in names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_failed_save_leaves_target_untouched(hf_checkpoint, tmp_path, monkeypatch):
    import foldmesh.hf._save as hf_save

    model = from_pretrained(hf_checkpoint("mixtral")[0])
    out = tmp_path / "out"
    save_pretrained(model, out)
    before = read_all(out)
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        safetensors_torch.save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_save, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, out, max_shard_bytes=16 * 1024)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    after = read_all(out)
    assert all(torch.equal(after[n], t) for n, t in before.items())
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        save_pretrained(model, tmp_path / "file")


def test_config_overrides(hf_checkpoint):
    model = from_pretrained(hf_checkpoint("mixtral")[0], dtype=torch.bfloat16,
                            config_overrides=dict(capacity_factor=2.0))
    assert model.config.capacity_factor == 2.0
    assert model.layers["0"].attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["debug-mixtral", "debug-qwen2", "debug-qwen3", "demo"])
def test_config_round_trip(name):
    cfg = replace(PRESETS[name], aux_loss_coeff=0.0)
    arch = infer_architecture(cfg)
    back, back_arch = config_from_hf(hf_config_from(cfg, arch))
    assert back_arch == arch
    assert [back.is_moe(i) for i in range(cfg.num_layers)] == \
        [cfg.is_moe(i) for i in range(cfg.num_layers)]
    assert back.resolved_head_dim == cfg.resolved_head_dim
    skip = ("head_dim", "first_k_dense", "dense_layers")
    assert {k: v for k, v in asdict(back).items() if k not in skip} == \
        {k: v for k, v in asdict(cfg).items() if k not in skip}


# ------------------------------------------------------------------------------------- errors
def copy_checkpoint(hf_checkpoint, tmp_path, kind="mixtral"):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint(kind)[0], dst)
    return dst


def edit_weights(path, edit):
    tensors = safetensors_torch.load_file(path / "model.safetensors")
    edit(tensors)
    safetensors_torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unknown_architecture(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*MixtralForCausalLM"):
        from_pretrained(path)


def test_missing_tensor(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    edit_weights(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"{name}.*layers\.1\.ffn\.experts\.w_up"):
        from_pretrained(path)


def test_extra_tensor_named_and_stale_inv_freq_ignored(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path)
    edit_weights(path, lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
        "model.layers.0.block_sparse_moe.bias": torch.ones(4)}))
    with pytest.raises(CheckpointError, match="block_sparse_moe.bias") as err:
        from_pretrained(path)
    assert "inv_freq" not in str(err.value)


def test_shape_mismatch(hf_checkpoint, tmp_path):
    path = copy_checkpoint(hf_checkpoint, tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    edit_weights(path, lambda t: t.update({name: torch.zeros(8, 32)}))
    with pytest.raises(CheckpointError, match=rf"{name}.*\(8, 32\).*\(16, 32\)"):
        from_pretrained(path)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_file(hf_checkpoint, tmp_path, missing):
    path = copy_checkpoint(hf_checkpoint, tmp_path)
    (path / missing).unlink()
    with pytest.raises(CheckpointError, match=missing):
        from_pretrained(path)


@pytest.mark.parametrize("kind,setting,value", [
    ("mixtral", "hidden_act", "gelu"),
    ("mixtral", "sliding_window", 4096),
    ("mixtral", "rope_parameters", {"rope_type": "longrope", "rope_theta": 1e6}),
    ("qwen2", "use_sliding_window", True),
    ("qwen3", "attention_bias", True),
])
def test_unsupported_setting_named(hf_checkpoint, kind, setting, value):
    cfg = json.loads((hf_checkpoint(kind)[0] / "config.json").read_text())
    cfg[setting] = value
    with pytest.raises(CheckpointError, match=setting.split("_parameters")[0]):
        config_from_hf(cfg)


def test_yarn_needs_its_original_context(hf_checkpoint):
    cfg = json.loads((hf_checkpoint("mixtral")[0] / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(CheckpointError, match="original_max_position_embeddings"):
        config_from_hf(cfg)
    with pytest.raises(ValueError, match="Yarn.factor"):
        replace(PRESETS["debug-mixtral"], rope_scaling={"factor": 0.5,
                                                        "original_max_position": 64})


@pytest.mark.parametrize("preset,arch,setting", [
    ("debug-qwen2", "MixtralForCausalLM", "shared_ffn_size"),
    ("debug-qwen3", "Qwen2MoeForCausalLM", "shared_ffn_size"),
    ("debug-mixtral", "Qwen3MoeForCausalLM", "qk_norm"),
    ("debug-mixtral", "GPT2LMHeadModel", "GPT2LMHeadModel"),
])
def test_unexpressible_save_named(preset, arch, setting):
    with pytest.raises(CheckpointError, match=setting):
        hf_config_from(PRESETS[preset], arch)


def test_parallel_arguments_need_a_mesh(hf_checkpoint):
    with pytest.raises(CheckpointError, match="mesh"):
        from_pretrained(hf_checkpoint("mixtral")[0], plan={})


# ------------------------------------------------------------------ sharded loading, 2 ranks
WORLD = 2
# Uneven rows (V = 63), experts by rank, FFN columns (F = 5 over 2), and a strided shard
# (experts 0, 2 on rank 0), which holds non-contiguous rows.
PLAN = {
    "embed.weight": [Shard(0)],
    "layers.0.attn.q_proj.weight": [Shard(0)],
    "layers.0.attn.o_proj.weight": [Shard(1)],
    "layers.0.ffn.experts.w_gate": [Shard(0)],
    "layers.0.ffn.experts.w_up": [Shard(2)],
    "layers.0.ffn.experts.w_down": [Shard(1)],
    "layers.1.ffn.experts.w_gate": [_StridedShard(0, split_factor=2)],
    "lm_head.weight": [Shard(1)],
}


def shard_params(model, mesh, plan):
    """A stand-in for foldmesh.parallelize: turn the planned (meta) parameters into DTensors."""
    for fqn, placements in plan.items():
        owner, attr = fqn.rsplit(".", 1)
        module = model.get_submodule(owner)
        dt = distribute_tensor(getattr(module, attr).detach(), mesh, placements)
        setattr(module, attr, nn.Parameter(dt))


@contextmanager
def spy_reads(reads):
    """Record (tensor name, index) of every slice read through safetensors."""
    real = hf_load.safe_open

    class Slice:
        def __init__(self, sl, name):
            self.sl, self.name = sl, name

        def get_shape(self):
            return self.sl.get_shape()

        def __getitem__(self, index):
            reads.append((self.name, index))
            return self.sl[index]

    @contextmanager
    def opener(f, framework):
        with real(f, framework) as h:
            class Handle:
                keys = h.keys

                def get_slice(self, name):
                    return Slice(h.get_slice(name), name)
            yield Handle()

    hf_load.safe_open = opener
    try:
        yield
    finally:
        hf_load.safe_open = real


def check_sharded_load(src, out):
    mesh = init_device_mesh("cpu", (WORLD,))
    rank = mesh.get_local_rank()
    reads = []
    with spy_reads(reads):
        model = from_pretrained(src, mesh=mesh, parallelize=shard_params, plan=PLAN)
    ref = dict(from_pretrained(src).named_parameters())
    for name, p in model.named_parameters():
        if name in PLAN:
            assert isinstance(p, DTensor), name
            want = distribute_tensor(ref[name].detach(), mesh, PLAN[name], src_data_rank=None)
            assert torch.equal(p.to_local(), want.to_local()), name
            assert torch.equal(p.full_tensor(), ref[name]), name
        else:
            assert torch.equal(p, ref[name]), name
    # Each rank read its experts only, and only its FFN columns of the others.
    experts = {n.split(".")[5] for n, _ in reads if n.startswith("model.layers.0.")
               and n.endswith("w1.weight")}
    assert experts == ({"0", "1"} if rank == 0 else {"2", "3"})
    strided = {n.split(".")[5] for n, _ in reads if n.startswith("model.layers.1.")
               and n.endswith("w1.weight")}
    assert strided == ({"0", "2"} if rank == 0 else {"1", "3"})
    ffn_rows = {(idx[0].start, idx[0].stop) for n, idx in reads
                if n.startswith("model.layers.0.") and n.endswith("w3.weight")}
    assert ffn_rows == {(0, 3) if rank == 0 else (3, 5)}
    save_pretrained(model, out)  # every rank gathers; rank 0 writes
    return rank


@pytest.fixture(scope="module")
def pool():
    with RankPool(WORLD, timeout=120) as p:
        yield p


def test_sharded_parameters_read_their_slices(pool, tmp_path):
    hf = build_hf("mixtral", vocab_size=63, intermediate_size=5)
    hf.save_pretrained(tmp_path / "src")
    assert pool.run(check_sharded_load, tmp_path / "src", tmp_path / "out") == [0, 1]
    ours, theirs = read_all(tmp_path / "out"), read_all(tmp_path / "src")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[n], t) for n, t in theirs.items())
