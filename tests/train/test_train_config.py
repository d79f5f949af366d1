"""Config loading: unknown keys, wrong types and impossible values fail at once naming the key; overrides apply."""
import pytest
import yaml

from lorafusion.train.config import ConfigError, RunConfig, load_config, parse_overrides, save_config


def _load(tmp_path, text=None, overrides=None, world_size=1):
    path = None
    if text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(text)
    return load_config(str(path) if path else None, overrides, world_size)


def test_defaults_are_valid(tmp_path):
    cfg = _load(tmp_path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name_or_path == "builtin:tiny-llama"
    assert cfg.grad_accum_steps(1) * cfg.micro_batch_samples() == cfg.batch.global_batch_size


@pytest.mark.parametrize("text,key", [
    ("lora:\n  rank: 8\n", "lora.rank"),
    ("optimiser:\n  lr: 0.1\n", "optimiser"),
    ("optimizer:\n  galore:\n    rnk: 4\n", "optimizer.galore.rnk"),
])
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        _load(tmp_path, text)


@pytest.mark.parametrize("text,key", [
    ("lora:\n  r: eight\n", "lora.r"),
    ("lora:\n  r: 8.5\n", "lora.r"),
    ("optimizer:\n  lr: fast\n", "optimizer.lr"),
    ("data:\n  packing: 3\n", "data.packing"),
    ("train:\n  max_steps: [1]\n", "train.max_steps"),
    ("lora: 5\n", "lora"),
])
def test_wrong_type_is_named(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(tmp_path, text)


@pytest.mark.parametrize("overrides,key", [
    ({"lora": {"r": 0}}, "lora.r"),
    ({"optimizer": {"lr": -1e-3}}, "optimizer.lr"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout"),
    ({"batch": {"micro_batch_size": 64, "global_batch_size": 32}}, "batch.micro_batch_size"),
    ({"batch": {"tokens_per_microbatch": 16, "global_batch_size": 16}, "data": {"max_length": 32}},
     "batch.tokens_per_microbatch"),
    ({"batch": {"micro_batch_size": 3, "global_batch_size": 32}}, "batch.global_batch_size"),
    ({"optimizer": {"name": "sgd"}}, "optimizer.name"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"train": {"max_steps": 10, "epochs": 1.0}}, "train.epochs"),  # both set: epochs was once silently ignored
    ({"train": {"seed": -1}}, "train.seed"),
    ({"train": {"seed": 2**32}}, "train.seed"),
    ({"optimizer": {"name": "galore_adamw", "galore": {"rank": 16}}, "lora": {"r": 16}}, "optimizer.galore.rank"),
    ({"optimizer": {"galore": {"proj_type": "foo"}}}, "optimizer.galore.proj_type"),
    ({"model": {"name_or_path": "builtin:foo"}}, "model.name_or_path"),
    ({"data": {"train": "builtin:foo"}}, "data.train"),
    ({"data": {"eval": "builtin:lowercase"}}, "data.eval"),
    ({"lora": {"backend": "gpu"}}, "lora.backend"),
    ({"optimizer": {"galore": {"layerwise": True}}, "train": {"precision": "fp16"}}, "optimizer.galore.layerwise"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"model": {"quantization": "int4"}}, "model.quantization"),
    ({"train": {"num_threads": 100000}}, "train.num_threads"),  # thousands of threads hung or crashed the run
])
def test_impossible_value_is_named(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(tmp_path, overrides=overrides)


@pytest.mark.parametrize("world,global_batch,micro", [(1, 32, 32), (2, 32, 16), (4, 32, 8), (1, 48, 24),
                                                      (2, 48, 24), (3, 48, 16), (1, 8, 8)])
def test_derived_microbatch_divides_each_process_share(tmp_path, world, global_batch, micro):
    """Without micro_batch_size, the microbatch is the most samples within tokens_per_microbatch (1024 // 32 = 32
    here) that divide each process's share of the global batch: the default config runs under torchrun on two
    processes (it once failed: 32 samples x 2 processes > 32)."""
    cfg = _load(tmp_path, overrides={"batch": {"global_batch_size": global_batch}}, world_size=world)
    assert cfg.micro_batch_samples(world) == micro
    assert cfg.grad_accum_steps(world) * micro * world == global_batch


def test_world_size_enters_the_batch_arithmetic(tmp_path):
    ov = {"batch": {"micro_batch_size": 4, "global_batch_size": 8}}
    assert _load(tmp_path, overrides=ov, world_size=2).grad_accum_steps(2) == 1
    with pytest.raises(ConfigError, match="batch.global_batch_size"):
        _load(tmp_path, overrides={"batch": {"micro_batch_size": 4, "global_batch_size": 12}}, world_size=2)
    with pytest.raises(ConfigError, match="batch.global_batch_size"):  # 32 samples cannot split over 3 processes
        _load(tmp_path, world_size=3)


def test_overrides_parse_yaml_scalars_and_nest():
    ov = parse_overrides(["--lora.r", "8", "--train.max_steps=5", "--lora.target_modules", "[q_proj, v_proj]",
                          "--data.packing", "false", "--optimizer.galore.rank", "4"])
    assert ov == {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "train": {"max_steps": 5},
                  "data": {"packing": False}, "optimizer": {"galore": {"rank": 4}}}
    with pytest.raises(ConfigError, match="missing a value"):
        parse_overrides(["--lora.r"])


def test_file_then_overrides_and_roundtrip(tmp_path):
    cfg = _load(tmp_path, "lora:\n  r: 4\n  alpha: 8\n", overrides={"lora": {"r": 2}})
    assert (cfg.lora.r, cfg.lora.alpha) == (2, 8.0)
    out = tmp_path / "resolved.yaml"
    save_config(cfg, str(out))
    again = load_config(str(out))
    assert again.to_dict() == cfg.to_dict()
    assert yaml.safe_load(out.read_text())["lora"]["r"] == 2


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_target_modules_that_match_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafusion.train.trainer import _target_modules

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert _target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert _target_modules(model, r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    # PEFT's rule for a list: a module's full path or a dotted suffix of it
    assert _target_modules(model, ["self_attn.q_proj", "model.layers.0.mlp.up_proj"]) == [
        "self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(ConfigError, match="lora.target_modules"):
        _target_modules(model, ["attn.q_proj"])  # not a whole dotted component: PEFT would not match it either
    with pytest.raises(ConfigError, match="lora.target_modules"):
        _target_modules(model, ["qkv"])
    with pytest.raises(ConfigError, match="lora.target_modules"):
        _target_modules(model, r".*\.query")


def test_floats_in_scientific_notation_are_floats(tmp_path):
    # YAML 1.1 reads 3e-4 (no dot) as a string; the config takes it as the number it is, from a file and the CLI
    cfg = _load(tmp_path, "optimizer:\n  lr: 3e-4\n  eps: 1E-6\n")
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.eps == 1e-6
    cfg = _load(tmp_path, overrides=parse_overrides(["--optimizer.lr", "1e-4", "--train.epochs", "2e0",
                                                     "--train.max_steps", "null"]))
    assert cfg.optimizer.lr == 1e-4 and cfg.train.epochs == 2.0
    with pytest.raises(ConfigError, match="optimizer.lr: expected float, got str"):
        _load(tmp_path, "optimizer:\n  lr: 1e-4x\n")
    with pytest.raises(ConfigError, match="lora.r: expected int"):
        _load(tmp_path, "lora:\n  r: 1e1\n")  # an int key stays an int key


def test_galore_rank_defaults_below_the_adapter_rank(tmp_path):
    cfg = _load(tmp_path, overrides={"optimizer": {"name": "galore_adamw"}, "lora": {"r": 16}})
    assert cfg.optimizer.galore.rank is None and cfg.galore_rank() == 4
    assert _load(tmp_path, overrides={"lora": {"r": 2}}).galore_rank() == 1


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="train.output_dir: is a file, not a folder"):
        _load(tmp_path, overrides={"train": {"output_dir": str(f)}})


@pytest.mark.parametrize("override, key", [
    (["--lora.alpha", ".nan"], "lora.alpha"), (["--lora.alpha", ".inf"], "lora.alpha"),
    (["--optimizer.max_grad_norm", ".nan"], "optimizer.max_grad_norm"),
    (["--train.max_steps", "null", "--train.epochs", ".nan"], "train.epochs"),
    (["--optimizer.betas", "[0.9, .nan]"], "optimizer.betas"),
])
def test_non_finite_numbers_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"{key}: must (be a finite number|hold finite numbers)"):
        _load(tmp_path, overrides=parse_overrides(override))


def test_a_key_given_twice_in_the_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="found the key 'lora' twice"):
        _load(tmp_path, "lora:\n  r: 4\n  alpha: 8\ntrain:\n  max_steps: 3\nlora:\n  dropout: 0.1\n")
    with pytest.raises(ConfigError, match="found the key 'max_steps' twice"):
        _load(tmp_path, "train:\n  max_steps: 3\n  max_steps: 5\n")


def test_cli_text_for_a_string_key_is_taken_as_typed(tmp_path, monkeypatch):
    cfg = _load(tmp_path, overrides=parse_overrides(["--train.output_dir", str(tmp_path / "2024"),
                                                     "--model.name_or_path", "builtin:tiny-llama"]))
    assert cfg.train.output_dir == str(tmp_path / "2024")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, parse_overrides(["--train.output_dir", "2024", "--lora.backend", "null"]))
    assert cfg.train.output_dir == "2024" and cfg.lora.backend is None
    with pytest.raises(ConfigError, match=r"train.max_steps: expected int or null, got float \(1.5\)"):
        load_config(None, parse_overrides(["--train.max_steps", "1.5"]))
    for text in ("@runs", "[exp1]", "runs: a", "#1", "*x"):  # not plain YAML scalars: still the folder's name
        assert parse_overrides(["--train.output_dir", text]) == {"train": {"output_dir": text}}
    for null in ("null", "Null", "NULL", "~"):  # str or null: YAML's null is null
        assert parse_overrides(["--data.eval", null]) == {"data": {"eval": None}}
    # str or list: a YAML list is a list, anything else the text as typed (a regex may start with "[")
    assert parse_overrides(["--lora.target_modules", "[q_proj, v_proj]"])["lora"]["target_modules"] == ["q_proj",
                                                                                                         "v_proj"]
    for text in ("[qv]_proj", "2024", r".*\.(q|v)_proj"):
        assert parse_overrides(["--lora.target_modules", text])["lora"]["target_modules"] == text


def test_a_section_override_merges_into_the_files_section(tmp_path):
    cfg = _load(tmp_path, "optimizer:\n  galore: {rank: 2, update_proj_gap: 50}\ndata:\n  max_length: 64\n",
                overrides=parse_overrides(["--optimizer.galore", "{scale: 0.5}", "--data", "{packing: false}"]))
    g = cfg.optimizer.galore
    assert (g.rank, g.update_proj_gap, g.scale) == (2, 50, 0.5)
    assert cfg.data.max_length == 64 and cfg.data.packing is False


def test_yaml_merge_keys_load_and_complex_keys_are_refused(tmp_path):
    cfg = _load(tmp_path, "lora:\n  <<: {r: 8, alpha: 16.0}\n  alpha: 4\n")
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 4.0)  # an explicit key overrides a merged one
    with pytest.raises(ConfigError, match="found a key that is not a scalar"):
        _load(tmp_path, "? [a, b]\n: 1\n")


def test_deepspeed_config_must_be_json(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="train.deepspeed_config: is not a readable JSON file"):
        _load(tmp_path, overrides={"train": {"deepspeed_config": str(bad)}})
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="train.deepspeed_config: must hold a JSON object"):
        _load(tmp_path, overrides={"train": {"deepspeed_config": str(bad)}})
