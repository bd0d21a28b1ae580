"""Typed experiment configs: YAML loading, errors that name the key, overrides, dumps."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from sparcom_jax.config import (
    ConfigError, DemoConfig, ExperimentConfig, apply_overrides, dump_config, from_dict, load_config,
    parse_override,
)
from sparcom_jax.models.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Published parameter counts of the real pairs (model cards / papers).
PUBLISHED = {
    "llama2_7b": 6.74e9,
    "mistral_7b": 7.24e9,
    "qwen25_7b": 7.62e9,
    "mixtral_8x7b": 46.7e9,
    "qwen15_moe_a27b": 14.3e9,
    "olmoe_1b_7b": 6.92e9,
}


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_configs_load_and_match_published_sizes(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.base.path and cfg.finetuned.path and cfg.base.hub_id and cfg.finetuned.hub_id
    assert cfg.base.template == "plain" and cfg.finetuned.template == "chat"
    n = ModelConfig.from_hf_config(cfg.architecture).param_count()
    assert abs(n / PUBLISHED[name] - 1) < 0.01, (name, n)
    # A mapping value is taken whole: the default split's train part must not leak in.
    assert cfg.data.split == yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["data"]["split"]


def test_partial_section_keeps_defaults_but_a_mapping_value_is_replaced(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\nbase: {path: /m}\ndata:\n  split: {identify: 0.7, ablate: 0.3}\n"))
    assert cfg.data.split == {"identify": 0.7, "ablate": 0.3}
    assert cfg.data.max_length == 512 and cfg.data.scope == "content"
    demo = load_config(write(tmp_path, "finetune: {total_steps: 12}\n"), cls=DemoConfig)
    assert demo.finetune.total_steps == 12
    assert demo.finetune.save_every == DemoConfig().finetune.save_every == 30  # the section's own default


def test_real_architectures_have_the_published_shapes():
    arch = {n: ModelConfig.from_hf_config(load_config(CONFIGS / f"{n}.yaml").architecture) for n in PUBLISHED}
    m = arch["mixtral_8x7b"]
    assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == (4096, 32, 32, 8)
    assert (m.num_experts, m.top_k, m.moe_intermediate_size, m.rope_theta) == (8, 2, 14336, 1e6)
    q = arch["qwen15_moe_a27b"]
    assert (q.num_experts, q.top_k, q.moe_intermediate_size, q.shared_expert_intermediate_size) == (60, 4, 1408, 5632)
    assert q.attention_bias and q.vocab_size == 151936
    o = arch["olmoe_1b_7b"]
    assert (o.num_experts, o.top_k, o.moe_intermediate_size, o.qk_norm, o.vocab_size) == (64, 8, 1024, "full", 50304)
    assert arch["mistral_7b"].sliding_window == 4096 and arch["mistral_7b"].num_kv_heads == 8
    q2 = arch["qwen25_7b"]
    assert (q2.hidden_size, q2.num_layers, q2.num_heads, q2.num_kv_heads) == (3584, 28, 28, 4)
    assert (q2.intermediate_size, q2.vocab_size) == (18944, 152064)
    assert q2.attention_bias and not q2.tie_word_embeddings and q2.sliding_window is None
    ll = arch["llama2_7b"]
    assert (ll.hidden_size, ll.num_layers, ll.num_heads, ll.num_kv_heads) == (4096, 32, 32, 32)
    assert (ll.intermediate_size, ll.vocab_size) == (11008, 32000)


def test_demo_yaml_is_the_builtin_default():
    assert load_config(CONFIGS / "demo.yaml", cls=DemoConfig) == DemoConfig()


def test_unknown_key_names_dotted_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "name: x\nidentify:\n  epz: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'identify.epz'" in msg and "did you mean 'eps'" in msg


def test_unknown_key_in_a_list_item(tmp_path):
    p = write(tmp_path, "name: x\nseries:\n  - path: /a\n    pth: /b\n")
    with pytest.raises(ConfigError, match=r"'series\[0\]\.pth'.*did you mean 'path'"):
        load_config(p)


@pytest.mark.parametrize("text, key, expected", [
    ("name: x\ncollect:\n  batch_size: eight\n", "collect.batch_size", "expected integer, got 'eight'"),
    ("name: x\ncollect:\n  batch_size: true\n", "collect.batch_size", "expected integer, got True"),
    ("name: x\nidentify:\n  eps: [1]\n", "identify.eps", "expected number"),
    ("name: x\ndata:\n  scope: prompts\n", "data.scope", "did you mean 'prompt'"),
    ("name: x\ncollect:\n  moe_impl: raged\n", "collect.moe_impl", "did you mean 'ragged'"),
    ("name: x\nmesh: 8\n", "mesh", "expected a mapping of keys (devices, data, model, num_processes, coordinator, "
                                    "distributed, init_timeout), got 8"),
    ("name: x\ntrain:\n  learning_rate: fast\n", "train.learning_rate", "expected number, got 'fast'"),
    ("name: [a]\n", "name", "expected string"),
    ("name: x\nidentify:\n  eps: true\n", "identify.eps", "expected number, got True"),  # not eps=1.0
])
def test_wrong_type_names_key_type_and_value(tmp_path, text, key, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{key}:" in msg and expected in msg and str(p) in msg


def test_value_checks_name_the_section(tmp_path):
    p = write(tmp_path, "name: x\ntrain:\n  optimizer: adam\n")
    with pytest.raises(ConfigError, match=r"train\.optimizer='adam' is not supported"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"identify\.eps must be in \(0, 1\]"):
        load_config(write(tmp_path, "name: x\nidentify: {eps: 2}\n"))


@pytest.mark.parametrize("text, expected", [
    ("data: {split: {train: 0.5, tune: 0.5}}", r"data\.split: unknown part\(s\) \['tune'\]"),
    ("data: {split: {train: 0.5, ablate: 0.5}}", r"data\.split: needs an 'identify' share"),
    ("data: {split: {identify: 0.5, ablate: 0.6}}", r"data\.split: shares .* sum to 1"),
    ("data: {split: {identify: 1.0, ablate: 0.0}}", r"data\.split: shares .* must be > 0"),
    ("data: {max_length: 0}", r"data\.max_length must be >= 1, got 0"),
    ("data: {split: {identify: 0.5, ablate: 0.45}}", r"data\.split: shares .* sum to 1"),  # 5% of records in no part
])
def test_data_section_checks_split_and_sizes(tmp_path, text, expected):
    # Both checks of DataSpec run (a second __post_init__ once silently replaced the split's).
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, f"name: x\n{text}\n"))


def test_split_shares_that_sum_to_one_in_floating_point_load(tmp_path):
    # 0.7 + 0.2 + 0.1 is 0.9999999999999999: a split the user wrote right must not be refused
    split = {"train": 0.7, "identify": 0.2, "ablate": 0.1}
    assert sum(split.values()) != 1.0
    assert load_config(write(tmp_path, BASE + f"data: {{split: {split}}}\n")).data.split == split


def test_a_top_level_that_is_not_a_mapping_is_named(tmp_path):
    p = write(tmp_path, "- name: x\n- base: {path: /m}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: the top level must be a mapping of keys, got list"


def test_cross_section_refusals_name_both_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"identify\.ties=break .* needs collect\.sums=true"):
        load_config(write(tmp_path, BASE), ["collect.sums=false"])
    assert not load_config(write(tmp_path, BASE), ["collect.sums=false", "identify.ties=keep"]).collect.sums
    for override in ("train.mesh_data=2", "train.mesh_model=2"):
        with pytest.raises(ConfigError, match=r"the mesh is set once, in the mesh: section"):
            load_config(write(tmp_path, BASE), [override])


def test_demo_buckets_below_the_data_max_length_are_refused():
    with pytest.raises(ConfigError, match=r"collect\.buckets: the largest bucket \(128\) is below data\.max_length=256"):
        load_config(None, ["collect.buckets=[64, 128]"], cls=DemoConfig)
    assert load_config(None, ["collect.buckets=[64, 128]", "data.max_length=128"], cls=DemoConfig).collect.buckets \
        == [64, 128]


def test_missing_required_key_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(write(tmp_path, "out_dir: /x\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "name: x\n\tbase: 1\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_that_is_not_utf8_a_directory_or_not_here_is_named(tmp_path, monkeypatch):
    (tmp_path / "latin.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml:1: not UTF-8 text \(byte 0xe9 at column 10\); save the file "
                                          "as UTF-8"):
        load_config(tmp_path / "latin.yaml")
    with pytest.raises(ConfigError, match=r": is a directory; pass the YAML config file itself"):
        load_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"nope.yaml: config file not found (relative to the current "
                                                    f"directory, {tmp_path})")):
        load_config("nope.yaml")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfname: x\r\nbase: {path: /m}\r\n")
    assert load_config("bom.yaml").name == "x"


def test_a_data_fields_key_that_is_not_a_record_field_fails_the_config(tmp_path):
    # checked on load, so a dry run on a machine without the data refuses it too
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.fields: 'inptu' is not a record field \(did you mean "
                                          r"'input'\?\)"):
        load_config(write(tmp_path, "name: x\nbase: {path: /m}\ndata: {path: /absent.jsonl, fields: {inptu: ctx}}\n"))
    ok = load_config(write(tmp_path, "name: x\nbase: {path: /m}\ndata: {adapter: dolly, fields: {context: ctx}}\n"))
    assert ok.data.fields == {"context": "ctx"}  # an adapter's own column names are its keys


def test_paths_expand_home_and_environment_variables(tmp_path, monkeypatch):
    # A shell expands them on the command line; written in a config, `~/runs` became a directory "~"
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setenv("MODELS", "/data/models")
    monkeypatch.delenv("NOPE", raising=False)
    cfg = load_config(write(tmp_path, "name: x\nout_dir: ~/runs/x\nbase: {path: $MODELS/base}\n"
                                      "finetuned: {path: '${MODELS}/chat'}\nseries: [{path: ~/ck/1}]\n"
                                      "data: {path: [~/a.jsonl, $MODELS/b.csv]}\ncollect: {store: ~/store}\n"),
                      ["train_data={path: $MODELS/train.jsonl}"])
    assert (cfg.out_dir, cfg.base.path, cfg.finetuned.path, cfg.series[0].path) == (
        "/home/u/runs/x", "/data/models/base", "/data/models/chat", "/home/u/ck/1")
    assert cfg.data.path == ["/home/u/a.jsonl", "/data/models/b.csv"] and cfg.collect.store == "/home/u/store"
    assert cfg.train_data.path == "/data/models/train.jsonl"
    assert load_config(write(tmp_path, "out_dir: ~/d\n", "d.yaml"), cls=DemoConfig).out_dir == "/home/u/d"
    with pytest.raises(ConfigError, match=re.escape("c.yaml: base.path: environment variable $NOPE in '$NOPE/m' is "
                                                    "not set; set it")):
        load_config(write(tmp_path, "name: x\nbase: {path: $NOPE/m}\n"))
    rel = load_config(write(tmp_path, "name: x\nbase: {path: models/b}\n"))
    assert rel.base.path == "models/b"  # relative: to the current directory, as on the command line


def test_demo_config_given_to_a_stage_says_so():
    with pytest.raises(ConfigError, match="this is a demo config; run it with `sparcom demo --config"):
        load_config(CONFIGS / "demo.yaml")


def test_experiment_config_given_to_the_demo_says_so():
    # `sparcom demo --config configs/qwen25_7b.yaml` said only "unknown key 'name'".
    path = CONFIGS / "qwen25_7b.yaml"
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: this is an experiment config \(it names a base "
                                          rf"model\), not a demo config; run it with `sparcom run --config {re.escape(str(path))}`"):
        load_config(path, cls=DemoConfig)


def test_bad_architecture_block_is_an_error(tmp_path):
    p = write(tmp_path, "name: x\narchitecture:\n  model_type: gpt2\n  hidden_size: 8\n")
    with pytest.raises(ConfigError, match=r"architecture: model_type 'gpt2' is not supported"):
        load_config(p)


def test_a_bad_init_block_is_named_by_its_config_key(tmp_path):
    # not by the model's label ("x.init" for a base at path x, "model.init" without one)
    arch = "{model_type: llama, num_attention_heads: 2, num_hidden_layers: 1}"
    for text, key in ((f"name: x\nbase: {{path: /m/x, init: {arch}}}\n", "base.init"),
                      (f"name: x\nbase: {{path: /m/x}}\nseries: [{{path: /m/y}}, {{init: {arch}}}]\n", "series[1].init"),
                      (f"name: x\nbase: {{path: /m/x}}\nfinetuned: {{name: t, init: {arch}}}\n", "finetuned.init")):
        with pytest.raises(ConfigError, match=rf"c\.yaml: {re.escape(key)}: required field 'hidden_size' is missing"):
            load_config(write(tmp_path, text))


def test_overrides_nested_values_lists_and_floats():
    cfg = load_config(CONFIGS / "llama2_7b.yaml", [
        "identify.eps=0.02", "mesh.devices=16", "mesh.model=2", "architecture.rope_theta=5e5",
        "series=[{path: /ckpt/a}, {path: /ckpt/b}]", "series.1.name=mid", "data.path=null",
        "identify.instruction_level=[expert_routed]",
    ])
    assert cfg.identify.eps == 0.02 and cfg.mesh.devices == 16 and cfg.mesh.model == 2
    assert cfg.architecture["rope_theta"] == 5e5
    assert [s.path for s in cfg.series] == ["/ckpt/a", "/ckpt/b"] and cfg.series[1].label == "mid"
    assert cfg.identify.instruction_level == ["expert_routed"]
    assert [m.label for m in cfg.models()] == ["llama2-7b", "a", "mid", "llama2-7b-chat"]


def test_override_errors_name_the_override():
    with pytest.raises(ConfigError, match=r"override 'identify\.epz=0\.1': unknown key 'identify\.epz'"):
        load_config(CONFIGS / "llama2_7b.yaml", ["identify.epz=0.1"])
    with pytest.raises(ConfigError, match=r"override 'collect\.batch_size=x': collect\.batch_size: expected integer"):
        load_config(CONFIGS / "llama2_7b.yaml", ["collect.batch_size=x"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("identify.eps")
    for text in ("=3", "data..max_length=3", ".seed=1", "seed.=1"):  # not "unknown key 'data.'"
        with pytest.raises(ConfigError, match=f"override {re.escape(repr(text))}: empty key"):
            parse_override(text)
    with pytest.raises(ConfigError, match="'series' has 0 item"):
        load_config(CONFIGS / "llama2_7b.yaml", ["series.0.path=/x"])


def test_override_order_does_not_matter_for_cross_field_checks():
    cfg = ExperimentConfig(name="x")
    a = apply_overrides(cfg, ["train.total_steps=5", "train.warmup_steps=1"])
    b = apply_overrides(cfg, ["train.warmup_steps=1", "train.total_steps=5"])
    assert a == b and a.train.total_steps == 5
    with pytest.raises(ConfigError, match="warmup_steps=10 must be smaller than total_steps=5"):
        apply_overrides(cfg, ["train.total_steps=5"])


def test_partial_section_keeps_the_other_defaults():
    cfg = from_dict(DemoConfig, {"finetune": {"total_steps": 60}})
    assert cfg.finetune.total_steps == 60
    assert cfg.finetune.template == "chat" and cfg.finetune.save_every == DemoConfig().finetune.save_every


def test_dump_config_round_trips_atomically(tmp_path):
    cfg = load_config(CONFIGS / "mixtral_8x7b.yaml", ["identify.eps=0.03", "series=[{path: /s}]"])
    p = dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(p) == cfg
    assert sorted(x.name for x in p.parent.iterdir()) == ["config.yaml"]  # no temp files left
    d = yaml.safe_load(p.read_text())
    assert d["identify"]["eps"] == 0.03 and d["architecture"]["num_local_experts"] == 8
    demo = dataclasses.replace(DemoConfig(), fast=True)
    assert load_config(dump_config(demo, tmp_path / "demo.yaml"), cls=DemoConfig) == demo


@pytest.mark.parametrize("impl", ["capacity", "ragged"])
def test_collect_moe_impl_reaches_the_loaded_model(impl, hf_checkpoint):
    # The config's collect.moe_impl is what the pipeline's models dispatch with, for
    # checkpoint directories and for `init` (random) models alike.
    from sparcom_jax.config import ModelSpec
    from sparcom_jax.pipeline.common import load_spec_model

    init = dict(model_type="mixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    for spec in (ModelSpec(name="m", init=init), ModelSpec(name="m", path=str(hf_checkpoint("mixtral")))):
        model = load_spec_model(spec, moe_impl=impl)
        assert model.blocks.ffn.impl == impl


# --- values the real run would reject only after loading the model ---------------

BASE = "name: x\nbase: {path: /m}\n"


@pytest.mark.parametrize("section, key, value, minimum", [
    ("data", "max_length", 0, 1),
    ("data", "n_per_category", 0, 1),
    ("data", "n_per_category", -3, 1),
    ("train_data", "max_length", -1, 1),
    ("collect", "batch_size", 0, 1),
    ("collect", "batch_size", -8, 1),
    ("ablation", "batch_size", 0, 1),
    ("ablation", "max_records", 0, 1),
    ("ablation", "n_random", -1, 0),
    ("mesh", "num_processes", 0, 1),
    ("mesh", "devices", 0, 1),
    ("mesh", "data", 0, 1),
    ("mesh", "model", 0, 1),
    ("mesh", "init_timeout", 0, 1),
    ("ablation", "neighbours", 0, 1),
    # "n_boot, n_perm, top_units and top_per_unit must be >= 0" named neither the key nor the value
    ("identify", "n_boot", -1, 0),
    ("identify", "n_perm", -1, 0),
    ("identify", "top_units", -2, 0),
    ("identify", "top_per_unit", -1, 0),
])
def test_out_of_range_values_name_the_dotted_key(tmp_path, section, key, value, minimum):
    p = write(tmp_path, BASE + f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: {section}.{key} must be >= {minimum}, got {value}"
    # the same check on the command line (so `--dry-run` fails too)
    with pytest.raises(ConfigError, match=re.escape(f"{section}.{key} must be >= {minimum}, got {value}")):
        load_config(write(tmp_path, BASE, "ok.yaml"), [f"{section}.{key}={value}"])


def test_the_smallest_valid_values_load(tmp_path):
    p = write(tmp_path, BASE + "data: {max_length: 1, n_per_category: 1}\ncollect: {batch_size: 1, buckets: [1]}\n"
                               "ablation: {n_random: 0, max_records: 1, batch_size: 1}\n")
    cfg = load_config(p)
    assert (cfg.data.max_length, cfg.collect.batch_size, cfg.ablation.n_random) == (1, 1, 0)
    assert load_config(p, ["data.n_per_category=null", "ablation.max_records=null"]).data.n_per_category is None


@pytest.mark.parametrize("override, message", [
    # each was accepted before, then failed (or silently did the wrong thing) in a real run
    ("report.dpi=0", "report.dpi must be >= 1, got 0"),  # matplotlib refused it after the whole analysis
    ("identify.threshold=1.5", "identify.threshold must be in [0, 1], got 1.5"),  # no unit could reach it
    ("identify.threshold=-0.5", "identify.threshold must be in [0, 1], got -0.5"),
    # a misspelt field silently dropped that field's N x N overlap
    ("identify.instruction_level=[neuron_active, expert_routd]",
     "identify.instruction_level: unknown count field(s) ['expert_routd']; use true, false or a list of "
     "neuron_active, expert_routed, expert_neuron_active"),
    # refused only when the records were read, without naming the key
    ("data.adapter=dolli", "data.adapter: unknown adapter 'dolli'; use one of"),
    ("train_data.adapter=gsm8", "train_data.adapter: unknown adapter 'gsm8'"),
])
def test_values_a_run_would_refuse_late_are_refused_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, BASE), [override])


def test_valid_adapters_thresholds_and_instruction_fields_load(tmp_path):
    cfg = load_config(write(tmp_path, BASE), [
        "data.adapter=auto", "train_data.adapter=dolly", "identify.threshold=1", "report.dpi=1",
        "identify.instruction_level=[neuron_active, expert_routed, expert_neuron_active]"])
    assert cfg.data.adapter == "auto" and cfg.train_data.adapter == "dolly" and cfg.identify.threshold == 1
    assert load_config(write(tmp_path, BASE), ["identify.threshold=0"]).identify.threshold == 0
    assert load_config(write(tmp_path, BASE), ["data.group_threshold=1"]).data.group_threshold == 1  # in (0, 1]


@pytest.mark.parametrize("buckets", ["[]", "[16, 0]"])
def test_collect_buckets_must_be_positive_lengths(tmp_path, buckets):
    with pytest.raises(ConfigError, match=r"collect\.buckets must be null or a non-empty list of lengths >= 1"):
        load_config(write(tmp_path, BASE + f"collect: {{buckets: {buckets}}}\n"))


# --- duplicate keys, a missing base ------------------------------------------------


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    p = write(tmp_path, BASE + "identify:\n  eps: 0.1\n  q: 0.5\n  eps: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:6: duplicate key 'eps' (lines 4 and 6); YAML would keep only the last")
    p = write(tmp_path, "name: x\nbase: {path: /m}\nname: y\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}:3: duplicate key 'name' (lines 1 and 3)")):
        load_config(p)


def test_merge_keys_may_still_be_overridden(tmp_path):
    from sparcom_jax.config import read_yaml

    p = write(tmp_path, "a: &d {x: 1, y: 2}\nb:\n  <<: *d\n  y: 3\n")
    assert read_yaml(p) == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}


def test_a_config_without_base_says_to_add_it(tmp_path):
    p = write(tmp_path, "name: x\nfinetuned: {path: /ft}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: no base model; add a `base:` section with `path:`")
    assert load_config(p, ["base.path=/m"]).base.path == "/m"
    init = ("{model_type: llama, hidden_size: 8, intermediate_size: 16, num_hidden_layers: 1, "
            "num_attention_heads: 2, num_key_value_heads: 1}")
    assert load_config(write(tmp_path, f"name: x\nbase: {{init: {init}}}\n", "i.yaml")).base.init


def test_data_category_map_maps_a_file_s_own_labels(tmp_path):
    # A file labelling a category its own way was refused with "pass category_map= to map
    # your labels", a Python argument no config key could give.
    import json

    from sparcom_jax.pipeline.common import record_parts

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"id": f"r{i}", "category": c, "instruction": f"Do {c} {i}.", "output": "ok"})
                         + "\n" for i, c in enumerate(["qa_open", "MATH", "qa_open"])))
    base = f"name: x\nbase: {{path: /m}}\ndata: {{path: {f}, split: null"
    with pytest.raises(ValueError, match=r"(?s)unknown category 'qa_open'.*category_map= \(data\.category_map in a "
                                         r"config\).*lenient=True \(data\.lenient in a config\)"):
        record_parts(load_config(write(tmp_path, base + "}\n")))
    from sparcom_jax.data import DataWarning

    cfg = load_config(write(tmp_path, base + ", category_map: {qa_open: general_qa}}\n"))
    with pytest.warns(DataWarning, match="the study covers 2 of the 6 categories"):
        assert [r.category for r in record_parts(cfg)[0]["identify"]] == ["general_qa", "math", "general_qa"]
    assert load_config(write(tmp_path, base + ", category_map: {qa_open: QA}}\n")).data.category_map == {
        "qa_open": "QA"}  # a short name is a category too
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.category_map: 'qa_open' -> unknown category 'quiz'"):
        load_config(write(tmp_path, base + ", category_map: {qa_open: quiz}}\n"))


def test_data_category_map_keys_written_as_numbers_map_the_files_number_labels(tmp_path):
    # A dataset labelling categories 0, 1, 2: the unquoted YAML keys are numbers, the file's labels
    # (JSON numbers or text) are read as text; 2.0 named the label "2.0", which no label is.
    import json

    from sparcom_jax.pipeline.common import record_parts

    f = tmp_path / "num.jsonl"
    f.write_text("".join(json.dumps({"id": f"r{i}", "category": c, "instruction": f"Do {i}.", "output": "ok"}) + "\n"
                         for i, c in enumerate([0, "1", 2, 1])))
    base = f"name: x\nbase: {{path: /m}}\ndata: {{path: {f}, split: null, category_map: "
    cfg = load_config(write(tmp_path, base + "{0: code, 1: math, 2.0: SUM}}\n"))
    assert cfg.data.category_map == {"0": "code", "1": "math", "2": "SUM"}
    from sparcom_jax.data import DataWarning

    with pytest.warns(DataWarning, match="covers 3 of the 6"):
        assert [r.category for r in record_parts(cfg)[0]["identify"]] == ["code", "math", "summarization", "math"]
    for bad, what in (("{yes: code}", r"the key True \(bool\) is not text.*'yes': code, not yes: code"),
                      ("{null: code}", r"the key None \(NoneType\) is not text"),
                      ("{1: code, '1': math}", r"two keys are both '1'.*keep one")):
        with pytest.raises(ConfigError, match=r"(?s)c\.yaml: data\.category_map: " + what):
            load_config(write(tmp_path, base + bad + "}\n"))


def test_a_key_in_the_wrong_section_names_the_section_that_has_it(tmp_path):
    # n_boot copied under ablation: (it belongs to identify) was only "unknown" with the
    # ablation keys listed, leaving the user to search the schema for it.
    with pytest.raises(ConfigError, match=r"unknown key 'ablation\.n_boot' \(did you mean 'identify\.n_boot'\?\); "
                                          r"valid keys of 'ablation': enabled,"):
        load_config(write(tmp_path, "name: x\nbase: {path: /m}\nablation:\n  n_boot: 3\n"))
    base = load_config(write(tmp_path, "name: x\nbase: {path: /m}\n"))
    with pytest.raises(ConfigError, match=r"'data\.out_dir' \(did you mean 'out_dir'\?\)"):
        apply_overrides(base, ["data.out_dir=runs/x"])
    with pytest.raises(ConfigError, match=r"'identify\.batch_size' \(did you mean 'collect\.batch_size' or "
                                          r"'train\.batch_size' or 'ablation\.batch_size'\?\)"):
        apply_overrides(base, ["identify.batch_size=4"])
    with pytest.raises(ConfigError) as e:  # a key no section has gets no such hint
        apply_overrides(base, ["collect.nonsense=1"])
    assert "did you mean" not in str(e.value)


def test_the_section_hint_goes_after_the_key_whatever_the_file_is_called(tmp_path):
    # The hint was patched into the formatted message before its first "; valid keys", which a
    # file's path can hold: the hint landed inside the path.
    d = tmp_path / "x; valid keys"
    d.mkdir()
    path = write(d, "name: x\nbase: {path: /m}\nablation:\n  n_boot: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: unknown key 'ablation.n_boot' (did you mean 'identify.n_boot'?); "
                                   "valid keys of 'ablation': enabled,")


def test_the_demos_held_out_records_all_keep_response_tokens_within_its_max_length():
    # At data.max_length=128 five of the eight held-out SUM records of the demo kept no
    # response token (their prompts run to ~190 tokens): SUM's causal-check loss rested on three.
    from sparcom_jax.data import encode_records
    from sparcom_jax.data.tokenizer import default_tokenizer
    from sparcom_jax.pipeline.common import ablate_records

    demo = DemoConfig()
    recs = ablate_records(ExperimentConfig(name="d", data=demo.data, ablation=demo.ablation, seed=demo.seed))
    assert len(recs) == 6 * demo.ablation.max_records
    for template in {demo.data.template, demo.finetune.template}:
        enc = encode_records(recs, default_tokenizer(), template=template, scope="response",
                             max_length=demo.data.max_length)
        assert all(s[1:].any() for s in enc.scopes), template
        assert max(map(len, enc.ids)) <= max(demo.collect.buckets)


def test_the_same_template_control_is_identified_alone_with_the_models_draws():
    """The control's sets are bootstrapped with the draws of the models' full analysis (the same
    replicates and clusters, for paired intervals) and its instruction-level overlap (its diagonal
    dominance); nothing else of the full analysis is run."""
    from sparcom_jax.config import IdentifySpec

    s = IdentifySpec(n_boot=7, n_perm=9, resample="record", top_units=3)
    full, sets, control = s.analysis_options(True), s.analysis_options(False), s.analysis_options(False, True)
    assert (full["n_boot"], full["n_perm"], full["top_units"]) == (7, 9, 3) and sets["n_boot"] == 0
    assert control == {**sets, "n_boot": full["n_boot"], "resample": full["resample"],
                       "instruction_level": full["instruction_level"]}
    assert not sets["instruction_level"] and full["instruction_level"]
