"""The trainer's config: layering, parsing, and errors that name the setting. No process groups."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from foldmesh.pipeline import SCHEDULES
from foldmesh.train import (
    TRAIN_PRESETS,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    format_config,
    load_config,
    model_config,
    validate_config,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@pytest.fixture
def toml_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "run.toml"
        path.write_text(text)
        return str(path)

    return write


def error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def with_(cfg: TrainConfig, **changes) -> TrainConfig:
    """``cfg`` with ``section__field=value`` changes."""
    for key, value in changes.items():
        section, name = key.split("__")
        cfg = dataclasses.replace(
            cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


# ---------------------------------------------------------------------------- layering
def test_preset_then_file_then_overrides(toml_file):
    path = toml_file('[training]\nsteps = 7\nglobal_batch = 4\n[model.overrides]\nnum_layers = 3\n')
    cfg = load_config(["--preset", "debug", "--config", path, "--training.steps", "9"])
    assert cfg.training.steps == 9  # override beats file
    assert cfg.training.global_batch == 4  # file beats preset
    assert cfg.data.seq_len == 32  # preset beats default
    # tables merge key by key: the preset's vocab_size survives the file's num_layers
    assert cfg.model.overrides == {"vocab_size": 256, "num_layers": 3}
    assert cfg.optimizer.lr == TrainConfig().optimizer.lr


def test_equals_form_and_value_types():
    cfg = load_config([
        "--training.steps=10", "--optimizer.lr", "3e-4", "--optimizer.grad_clip", "1",
        "--checkpoint.resume", "false", "--fold.data_parallel", "replicate",
        "--checkpoint.dir=runs/x y", "--data.path", "2024",
        "--model.overrides", "{num_layers = 2, dense_layers = [0]}",
        "--model.overrides.num_heads", "4",
    ])
    assert cfg.training.steps == 10
    assert cfg.optimizer.lr == 3e-4
    assert cfg.optimizer.grad_clip == 1.0 and isinstance(cfg.optimizer.grad_clip, float)
    assert cfg.checkpoint.resume is False
    assert cfg.fold.data_parallel == "replicate"  # a bare word is a string
    assert cfg.checkpoint.dir == "runs/x y"
    assert cfg.data.path == "2024"  # string fields keep their text
    assert cfg.model.overrides == {"num_layers": 2, "dense_layers": (0,), "num_heads": 4}


def test_integral_float_is_an_int_but_a_fraction_is_not():
    assert config_from_dict({"training": {"steps": 1e3}}).training.steps == 1000
    assert "training.steps" in error(config_from_dict, {"training": {"steps": 2.5}})


def test_last_override_wins():
    assert load_config(["--training.steps", "1", "--training.steps=2"]).training.steps == 2


# ---------------------------------------------------------------------------- key and type errors
def test_unknown_section_and_key_suggest():
    msg = error(config_from_dict, {"trainig": {"steps": 1}})
    assert "trainig" in msg and "'training'" in msg
    msg = error(load_config, ["--training.stesp", "1"])
    assert "training.stesp" in msg and "steps" in msg
    # a key in the wrong section points at the right one
    msg = error(config_from_dict, {"training": {"seq_len": 8}})
    assert "training.seq_len" in msg and "data.seq_len" in msg
    assert "training.steps" in error(config_from_dict, {"steps": 3})


@pytest.mark.parametrize("d, key", [
    ({"training": {"steps": "ten"}}, "training.steps"),
    ({"training": {"steps": True}}, "training.steps"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr"),
    ({"checkpoint": {"resume": 1}}, "checkpoint.resume"),
    ({"data": {"path": 3}}, "data.path"),
    ({"model": {"overrides": 2}}, "model.overrides"),
    ({"model": {"overrides": {"num_layers": "two"}}}, "model.overrides.num_layers"),
    ({"training": 5}, "[training]"),
])
def test_bad_type_names_the_key(d, key):
    assert key in error(config_from_dict, d)


def test_quoted_number_suggests_removing_quotes():
    assert "without quotes" in error(config_from_dict, {"training": {"steps": "10"}})


def test_model_overrides_unknown_field():
    msg = error(config_from_dict, {"model": {"overrides": {"num_layer": 2}}})
    assert "model.overrides.num_layer" in msg and "num_layers" in msg
    assert "model.overrides.hiden_size" in error(load_config, ["--model.overrides.hiden_size", "8"])


@pytest.mark.parametrize("argv, words", [
    (["--training.steps"], ["--training.steps", "needs a value"]),
    (["--training.steps", "--optimizer.lr", "1"], ["--training.steps", "needs a value"]),
    (["steps=3"], ["steps=3", "--section.field"]),
    (["--steps", "3"], ["--steps", "--section.field"]),
    (["--preset", "dmo"], ["--preset", "'demo'"]),
    (["--config", "/no/such.toml"], ["--config", "no such file"]),
])
def test_bad_arguments(argv, words):
    msg = error(load_config, argv)
    assert all(w in msg for w in words), msg


def test_bad_toml_file(toml_file):
    assert "not valid TOML" in error(load_config, ["--config", toml_file("[training\n")])


def test_file_errors_say_where(toml_file):
    msg = error(load_config, ["--config", toml_file("[training]\nsteps = 'x'\n")])
    assert "run.toml" in msg and "training.steps" in msg


def test_help_lists_fields_with_docstrings(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--training.steps", "3", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--training.global_batch" in out
    assert "Sequences per optimizer step over all data-parallel replicas." in out
    assert all(name in out for name in TRAIN_PRESETS)


# ---------------------------------------------------------------------------- validation
def demo() -> TrainConfig:
    return load_config(["--preset", "demo"])


@pytest.mark.parametrize("preset, worlds", [
    ("demo", [8]), ("debug", [1, 2, 4, 8]), ("single-gpu", [1]),
])
def test_presets_fit_their_world(preset, worlds):
    cfg = load_config(["--preset", preset])
    for world in worlds:
        validate_config(cfg, world)


@pytest.mark.parametrize("key, value", [
    ("fold__dispatcher", "all2all"), ("fold__data_parallel", "ddp"),
    ("fold__activation_checkpoint", "selective"), ("data__source", "web"),
    ("data__dtype", "int32"), ("training__dtype", "fp16"), ("training__on_nonfinite", "ignore"),
    ("training__device", "gpu"),
])
def test_bad_choice(key, value):
    msg = error(validate_config, with_(demo(), **{key: value}), 8)
    assert key.replace("__", ".") in msg and repr(value) in msg


@pytest.mark.parametrize("key, value", [
    ("training__steps", 0), ("training__global_batch", -1), ("data__seq_len", 0),
    ("optimizer__lr", 0.0), ("optimizer__lr", float("nan")), ("data__val_fraction", 1.0),
    ("checkpoint__keep", 0), ("training__micro_batch", -2), ("metrics__log_every", 0),
])
def test_out_of_range(key, value):
    assert key.replace("__", ".") in error(validate_config, with_(demo(), **{key: value}), 8)


def test_python_built_config_is_type_checked():
    assert "training.steps" in error(validate_config, with_(demo(), training__steps="3"), 8)


def test_fold_must_fit_the_world():
    msg = error(validate_config, demo(), 6)  # tp=2 cp=2 ep=4 etp=2 on 6 ranks
    assert "fold.tp=2" in msg and "world size 6" in msg


def test_pipeline_parallel_accepted():
    # 16 ranks: pp2 x (tp2 cp2 dp2); 8 sequences per replica in 2 micro-batches
    validate_config(with_(demo(), fold__pp=2, training__micro_batch=4), 16)
    validate_config(with_(demo(), fold__pp=2, training__micro_batch=4,
                          fold__pp_schedule="Interleaved1F1B", fold__pp_layers=(1, 1, 1, 1)), 16)


PP = dict(fold__pp=2, training__micro_batch=4)  # the demo on 16 ranks, 2 micro-batches


@pytest.mark.parametrize("changes, words", [
    # one micro-batch per step (no accumulation) for 2 stages
    (dict(fold__pp=2), ["fold.pp_schedule = '1F1B'", "at least as many micro-batches",
                        "training.micro_batch 0 (the whole replica batch) gives 1"]),
    (dict(PP, fold__pp_schedule="Zigzag"), ["fold.pp_schedule = 'Zigzag'", "1F1B", "GPipe"]),
    pytest.param(dict(PP, fold__pp_schedule="ZBVZeroBubble", fold__pp_stages_per_rank=1),
                 ["'ZBVZeroBubble'", "exactly fold.pp_stages_per_rank = 2"],
                 marks=pytest.mark.skipif("ZBVZeroBubble" not in SCHEDULES,
                                          reason="V schedules need torch >= 2.13")),
    (dict(PP, fold__pp_stages_per_rank=2), ["runs one stage per rank", "Interleaved1F1B"]),
    (dict(PP, fold__pp_schedule="Interleaved1F1B", fold__pp_stages_per_rank=3),
     ["4 layers cannot be split over 6 pipeline stages", "fold.pp_stages_per_rank"]),
    (dict(PP, fold__pp_layers=(3, 2)), ["fold.pp_layers = [3, 2]", "4 layers", "2 stages"]),
    # 5 micro-batches in rounds of pp = 2: not a multiple of max(1, 5 // 2) = 2
    (dict(fold__pp=2, fold__pp_schedule="Interleaved1F1B", training__global_batch=10,
          training__micro_batch=1), ["rounds of fold.pp = 2", "got 5"]),
    (dict(PP, model__overrides={"tie_embeddings": True}),
     ["tied embeddings", "model.overrides.tie_embeddings"]),
], ids=["too-few-microbatches", "unknown-schedule", "v-needs-two", "single-stage-schedule",
        "layers-over-stages", "bad-split", "interleaved-rounds", "tied"])
def test_pipeline_errors_name_the_setting(changes, words):
    msg = error(validate_config, with_(demo(), **changes), 16)
    for w in words:
        assert w in msg, (w, msg)


def test_global_batch_over_dp():
    msg = error(validate_config, with_(demo(), training__global_batch=15), 8)  # dp = 2
    assert "training.global_batch" in msg and "dp = 2" in msg


def test_micro_batch_divides_replica_batch():
    msg = error(validate_config, with_(demo(), training__micro_batch=3), 8)  # 8 per replica
    assert "training.micro_batch" in msg and "[1, 2, 4, 8]" in msg
    validate_config(with_(demo(), training__micro_batch=4), 8)


@pytest.mark.parametrize("seq", [126, 130])  # 2cp = 4 chunks: 126 % 4; tp = 2: (130/2) % 2
def test_seq_len_over_cp_and_tp(seq):
    msg = error(validate_config, with_(demo(), data__seq_len=seq), 8)
    assert "data.seq_len" in msg and "multiple of 4" in msg


def test_heads_over_tp():
    cfg = with_(demo(), fold__tp=4, fold__cp=1, model__overrides={"num_heads": 2,
                                                                   "num_kv_heads": 2})
    msg = error(validate_config, cfg, 8)
    assert "num_heads = 2" in msg and "fold.tp = 4" in msg and "model.overrides" in msg
    msg = error(validate_config, with_(demo(), fold__tp=16, fold__cp=1), 16)  # 8 heads
    assert "num_heads = 8" in msg and "fold.tp = 16" in msg and "model.preset 'demo'" in msg


def test_expert_counts_over_ep_and_etp():
    cfg = with_(demo(), model__overrides={"num_experts": 6})
    msg = error(validate_config, cfg, 8)
    assert "num_experts" in msg and "fold.ep = 4" in msg
    cfg = with_(demo(), model__overrides={"expert_ffn_size": 33})
    msg = error(validate_config, cfg, 8)
    assert "expert_ffn_size" in msg and "fold.etp = 2" in msg


def test_model_preset_and_overrides():
    msg = error(validate_config, with_(demo(), model__preset="dmo"), 8)
    assert "model.preset" in msg and "'demo'" in msg
    cfg = with_(demo(), model__overrides={"num_kv_heads": 3})  # 8 heads / 3 kv heads
    assert "model.overrides" in error(validate_config, cfg, 8)
    assert model_config(load_config(["--preset", "debug"])).vocab_size == 256


def test_byte_sources_need_a_byte_vocabulary():
    cfg = with_(demo(), model__preset="debug-mixtral")  # vocab 64 < 256
    msg = error(validate_config, cfg, 8)
    assert "model.overrides.vocab_size" in msg and "data.source" in msg


def test_file_sources_need_a_path(tmp_path):
    msg = error(validate_config, with_(demo(), data__source="tokens"), 8)
    assert "data.path" in msg
    cfg = with_(demo(), data__source="text", data__path=str(tmp_path / "missing"))
    assert "data.path" in error(validate_config, cfg, 8)
    validate_config(with_(demo(), data__source="text", data__path=str(tmp_path)), 8)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_round_trips(preset, toml_file):
    cfg = load_config(["--preset", preset, "--model.overrides.dense_layers", "[1]",
                       "--checkpoint.dir", 'odd "dir"\\x\t'])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    text = format_config(cfg)
    assert config_from_dict(tomllib.loads(text)) == cfg
    assert list(tomllib.loads(text)) == list(config_to_dict(cfg))  # sections in order
    # the printed config, saved as a file, reproduces the run
    assert load_config(["--config", toml_file(text)]) == cfg


PAPER = {"mixtral_8x22b": (128, 8), "qwen2_57b_a14b": (64, 4), "mixtral_8x22b_g8t8": (128, 8),
         "llama3_8x70b": (256, 16)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_pass_the_check_on_their_gpu_count(name):
    """configs/paper/*.toml parse and pass the configuration check, pipeline included, on
    their GPU count (and not on one GPU fewer per stage)."""
    gpus, pp = PAPER[name]
    path = Path(__file__).parents[2] / "configs" / "paper" / f"{name}.toml"
    cfg = load_config(["--config", str(path)])
    assert cfg.fold.pp == pp
    cfg.data.path = str(path)  # any existing file: the corpus is not read here
    validate_config(cfg, gpus)
    assert "fold" in error(validate_config, cfg, gpus - pp)


def test_overrides_do_not_change_the_presets():
    """Layers merge into a copy: an override of a preset's table in one load_config must not
    leak into the next (it did, through the shared nested dict)."""
    load_config(["--preset", "debug", "--model.overrides.dense_layers", "[1]"])
    assert "dense_layers" not in load_config(["--preset", "debug"]).model.overrides


def test_rope_scaling_is_a_table_of_yarn_fields(toml_file):
    path = toml_file("[model.overrides]\n"
                     "rope_scaling = { factor = 4, original_max_position = 16 }\n")
    cfg = load_config(["--preset", "debug", "--config", path])
    yarn = model_config(cfg).rope_scaling
    assert (yarn.factor, yarn.original_max_position, yarn.beta_fast) == (4.0, 16, 32.0)
    # the run config written to disk reads back to the same model
    assert model_config(config_from_dict(config_to_dict(cfg))).rope_scaling == yarn
    bad = ["--preset", "debug", "--model.overrides.rope_scaling"]
    assert "did you mean 'factor'" in error(load_config, [*bad, "{factr = 2}"])
    assert "Yarn.factor must be >= 1" in error(
        lambda a: model_config(load_config(a)), [*bad, "{factor = 0.5, original_max_position = 8}"])
