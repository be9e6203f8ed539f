import pytest

from llmdiff.config import config_from_mapping, make_config, parse_modules, parse_steps
from llmdiff.errors import UsageError


@pytest.mark.parametrize(("spec", "inside", "outside"), [
    ("0", [0], [1]),
    ("0-3", [0, 1, 2, 3], [4]),
    ("0,2,5-7", [0, 2, 5, 6, 7], [1, 3, 4, 8]),
    ("all", [0, 1, 999], []),
    (3, [3], [2, 4]),
    ([1, 4], [1, 4], [2]),
])
def test_steps_grammar(spec, inside, outside):
    steps = parse_steps(spec)
    assert all(s in steps for s in inside)
    assert not any(s in steps for s in outside)


@pytest.mark.parametrize(("spec", "message"), [
    ("3-1", "steps: range '3-1' runs backwards (start > end)"),
    ("a", "steps: 'a' is not 'all' or ranges like '0,2,5-7'"),
    ("1,,2", "steps: '1,,2' is not 'all' or ranges like '0,2,5-7'"),
    ("-1", "steps: '-1' is not 'all' or ranges like '0,2,5-7'"),
])
def test_bad_steps_name_the_option(spec, message):
    with pytest.raises(UsageError) as err:
        parse_steps(spec)
    assert str(err.value) == message


def test_call_index_suffix_and_colons_inside_regexes():
    (plain,) = parse_modules(r"layers\.0\.mlp")
    assert plain.call is None
    (pinned,) = parse_modules("rotary_emb:1")
    assert pinned.regex.pattern == "rotary_emb" and pinned.call == 1
    (noncapturing,) = parse_modules(r"layers\.(?:0|1)\.self_attn")
    assert noncapturing.call is None and noncapturing.matches("model.layers.1.self_attn")
    (both,) = parse_modules(r"(?:q|k)_proj:2")
    assert both.call == 2 and both.matches("model.layers.0.self_attn.k_proj")


def test_module_and_type_filters_must_both_match():
    config = make_config(modules=["layers"], types=["LlamaMLP"])
    assert config.selects_module("model.layers.0.mlp", "LlamaMLP")
    assert not config.selects_module("model.layers.0.self_attn", "LlamaAttention")
    assert not config.selects_module("model.norm", "LlamaMLP")


@pytest.mark.parametrize(("options", "message"), [
    ({"modules": ["(unclosed"]},
     "modules: '(unclosed' is not a valid regex (missing ), unterminated subpattern at position 0)"),
    ({"mode": "full"}, "mode: 'full' is not one of tensor, stats"),
    ({"parts": "input"}, "parts: 'input' is not one of inputs, outputs, both"),
    ({"max_tensor_size": -1}, "max_tensor_size: expected a non-negative element count, got -1"),
    ({"ranks": "a,b"}, "ranks: expected integers like '0,1', got 'a,b'"),
    ({"colour": 1}, "config: unknown option(s) colour; known: devices, hash, level, max_tensor_size, mode, modules, "
                    "ops_allow, ops_deny, ops_file, parts, "
                    "ranks, scope, steps, types"),
    ({"scope": ["a"]}, "scope: expected [first, last] module regexes, got ['a']"),
    ({"log_step_ids": "x", "enabled": True}, "config: log_step_ids: 'x' is not 'all' or ranges like '0,2,5-7'"),
])
def test_bad_options_give_one_line_naming_the_option(options, message):
    with pytest.raises(UsageError) as err:
        config_from_mapping(options)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_config_round_trips_through_json():
    config = make_config(modules=[r"layers\.0\.", "rotary_emb:0"], types=["LlamaMLP"], steps="0,2-3",
                         parts="outputs", mode="stats", devices=["cpu"], ranks="0,1", max_tensor_size=10, hash=True)
    assert config_from_mapping(config.to_json()) == config
