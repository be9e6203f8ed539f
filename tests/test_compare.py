"""End-to-end comparison on a tiny Llama: healthy precision changes pass, planted faults are localized."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import llmdiff
from llmdiff.testing import tiny_llama

PROMPT = torch.tensor([[3, 17, 42, 99, 5, 64, 23, 8, 71, 12]])
NEW_TOKENS = 5


def run(model, path, **options):
    options.setdefault("steps", "all")
    with llmdiff.capture(model, path, **options), torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def scale_output(module, factor):
    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (output[0] * factor, *output[1:])
        return output * factor
    module.register_forward_hook(hook)


def push_least_likely_token(model, from_call):
    """From the ``from_call``-th forward call on, push the least likely token to the top: a real departure."""
    calls = {"n": 0}

    def count(m, a):
        calls["n"] += 1

    def push(m, a, logits):
        if calls["n"] < from_call:
            return logits
        return logits + 100.0 * torch.nn.functional.one_hot(logits[0, -1].argmin(), logits.shape[-1])

    model.register_forward_pre_hook(count)
    model.lm_head.register_forward_hook(push)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    paths = {}
    for name in ("golden", "golden_again", "bf16", "fp32_mlp", "bf16_mlp", "fp32_norm", "bf16_q", "flip",
                 "stats_golden", "stats_mlp"):
        model = tiny_llama(layers=4)
        layers = model.model.layers
        options = {}
        if name.startswith("bf16"):
            model = model.to(torch.bfloat16)
        if name.endswith("mlp"):
            scale_output(layers[1].mlp, 1.05)
        if name == "fp32_norm":
            layers[2].post_attention_layernorm.variance_epsilon = 0.1
        if name == "bf16_q":
            scale_output(layers[2].self_attn.q_proj, 1.3)
        if name == "flip":
            push_least_likely_token(model, from_call=3)
        if name.startswith("stats"):
            options["mode"] = "stats"
        paths[name] = root / name
        run(model, paths[name], **options)
    return paths


def test_identical_runs_match(dumps):
    report = llmdiff.compare(dumps["golden"], dumps["golden_again"])
    assert report.verdict == "match" and report.exit_code == 0 and bool(report)
    assert report.first_divergence is None and report.culprits == []
    assert all(e.status == "pass" and e.error == 0.0 for e in report.entries)
    assert [t.step for t in report.tokens.steps] == list(range(NEW_TOKENS))


def test_healthy_bf16_against_fp32_passes_by_default(dumps):
    report = llmdiff.compare(dumps["golden"], dumps["bf16"])
    assert report.verdict == "match", (report.first_divergence, report.culprits)
    assert max(e.error for e in report.entries if e.error is not None) > 1e-3  # there is bf16 noise...
    assert report.first_divergence is None  # ...and it is judged as noise


def test_fp32_fault_first_divergence_and_culprit(dumps):
    report = llmdiff.compare(dumps["golden"], dumps["fp32_mlp"])
    assert report.verdict == "diverged" and report.exit_code == 1
    fd = report.first_divergence
    assert (fd["step"], fd["module"], fd["part"]) == (0, "model.layers.1.mlp", "output")
    top = report.culprits[0]
    assert (top.module, top.step) == ("model.layers.1.mlp", 0)
    assert "inputs agree" in top.reason and top.input_error < 1e-6 and top.output_error > 0.04
    # the decoder layer around it and the modules after it are not blamed
    assert all(c.module != "model.layers.1" for c in report.culprits)


def test_fp32_norm_fault_names_the_norm_not_its_layer(dumps):
    report = llmdiff.compare(dumps["golden"], dumps["fp32_norm"])
    assert report.verdict == "diverged"
    assert report.culprits[0].module == "model.layers.2.post_attention_layernorm"
    assert report.first_divergence["module"] == "model.layers.2.post_attention_layernorm"


@pytest.mark.parametrize(("name", "module"), [("bf16_mlp", "model.layers.1.mlp"),
                                              ("bf16_q", "model.layers.2.self_attn.q_proj")])
def test_bf16_fault_hidden_in_noise_is_found(dumps, name, module):
    report = llmdiff.compare(dumps["golden"], dumps[name])
    assert report.verdict == "diverged"
    assert report.culprits[0].module == module
    assert report.culprits[0].confirmed


def test_real_token_departure(dumps):
    report = llmdiff.compare(dumps["golden"], dumps["flip"])
    assert report.verdict == "diverged"
    flip = report.tokens.first_flip
    assert flip["step"] == 2 and flip["target_token"] != flip["golden_token"] and flip["near_tie"] is False
    assert report.tokens.first_out_of_budget == 2
    steps = {e.step: e.status for e in report.entries if e.module == "model.embed_tokens" and e.part == "output"}
    assert steps[2] == "pass" and steps[3] == "tokens_differ" and steps[4] == "tokens_differ"
    assert (report.first_divergence["module"], report.first_divergence["step"]) == ("lm_head", 2)
    assert report.culprits[0].module == "lm_head"


def test_stats_only_dumps(dumps):
    same = llmdiff.compare(dumps["stats_golden"], dumps["golden"])
    assert same.verdict == "match"
    assert all(e.kind == "stats" for e in same.entries)
    assert any("statistics only" in n for n in same.comparison.notes)
    faulty = llmdiff.compare(dumps["stats_golden"], dumps["stats_mlp"])
    assert faulty.verdict == "diverged"
    assert faulty.first_divergence["module"] == "model.layers.1.mlp"


def test_missing_entries_make_the_verdict_incomplete(dumps, tmp_path):
    model = tiny_llama(layers=4)
    run(model, tmp_path / "partial", modules=[r"layers\.[01]\."])
    report = llmdiff.compare(dumps["golden"], tmp_path / "partial")
    assert report.verdict == "incomplete" and report.exit_code == 1
    missing = [e for e in report.entries if e.status == "missing_in_target"]
    assert missing and all(e.reason == "only in the golden" for e in missing)
    narrowed = llmdiff.compare(dumps["golden"], tmp_path / "partial", modules=[r"layers\.[01]\."])
    assert narrowed.verdict == "match"
    allowed = llmdiff.compare(dumps["golden"], tmp_path / "partial", allow_missing=True)
    assert allowed.verdict == "match" and allowed.comparison.counts["missing_in_target"] == len(missing)


@pytest.mark.parametrize("selection", [{"modules": ["no_such_module"]}, {"steps": "40-50"},
                                       {"steps": "40", "allow_missing": True}])
def test_a_comparison_that_compared_nothing_is_not_a_match(dumps, selection):
    report = llmdiff.compare(dumps["golden"], dumps["golden_again"], **selection)
    assert report.entries == [] and report.verdict == "incomplete" and report.exit_code == 1
    assert any(n.startswith("nothing was compared: --") for n in report.comparison.notes)
    args = [a for k, v in selection.items() if k != "allow_missing" for a in (f"--{k}", *([v] if isinstance(v, str)
                                                                                          else v))]
    shown = cli("compare", dumps["golden"], dumps["golden_again"], *args)
    assert shown.returncode == 1 and "no tensor was compared" in shown.stdout and "entries: none" in shown.stdout


def test_steps_filter_and_mapping(dumps, tmp_path):
    report = llmdiff.compare(dumps["golden"], dumps["golden_again"], steps="1-2")
    assert {e.step for e in report.entries} == {1, 2}
    mapping = tmp_path / "map.yaml"
    mapping.write_text("target:\n  - ['^model\\.layers\\.(\\d+)', 'decoder.h.\\1']\n"
                       "golden:\n  - ['^model\\.layers\\.(\\d+)', 'decoder.h.\\1']\n")
    mapped = llmdiff.compare(dumps["golden"], dumps["golden_again"], mapping=mapping)
    assert mapped.verdict == "match" and any(e.module == "decoder.h.0.mlp" for e in mapped.entries)
    one_sided = tmp_path / "one.json"
    one_sided.write_text(json.dumps([["^model\\.layers\\.(\\d+)", "decoder.h.\\1"]]))
    assert llmdiff.compare(dumps["golden"], dumps["golden_again"], mapping=one_sided).verdict == "incomplete"


def test_shape_mismatch_has_its_own_status(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.proj = torch.nn.Linear(4, n)

        def forward(self, x):
            return self.proj(x)

    for name, n in (("a", 3), ("b", 5)):
        with llmdiff.capture(Net(n), tmp_path / name, parts="outputs") as run, torch.no_grad():
            run.model(torch.ones(1, 4))
    report = llmdiff.compare(tmp_path / "a", tmp_path / "b")
    statuses = {e.name: (e.status, e.reason) for e in report.entries}
    assert statuses["proj:0 output"] == ("shape_mismatch", "shape [1, 3] vs [1, 5]")
    assert report.verdict == "diverged"


ALGORITHM = '''
import torch

def max_ratio(golden, target):
    return float((target.double().abs().max() / golden.double().abs().max())), "ratio of maxima"
'''


def test_every_report_format_parses_back(dumps, tmp_path):
    (tmp_path / "alg.py").write_text(ALGORITHM)
    report = llmdiff.compare(dumps["golden"], dumps["fp32_mlp"], algorithms=[f"{tmp_path / 'alg.py'}:max_ratio"])
    report.save(tmp_path / "r.json")
    report.save(tmp_path / "r.csv")
    report.save(tmp_path / "r.md")
    report.save(tmp_path / "r.html")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["verdict"] == "diverged" and data["exit_code"] == 1
    assert data["culprits"][0]["module"] == "model.layers.1.mlp"
    assert set(data["culprits"][0]) >= {"rank", "step", "module", "call", "score", "input_error", "output_error",
                                        "reason"}
    assert set(data["first_divergence"]) >= {"rank", "step", "module", "call", "part", "name", "metrics"}
    assert data["tokens"]["steps"][0]["kl"] is not None
    floats = [e for e in data["entries"] if e["golden_dtype"] == "float32"]
    assert "max_ratio" in floats[0]["metrics"] and "max_ratio" in data["metric_names"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert len(rows) == len(report.entries)
    failing = [r for r in rows if r["status"] == "fail"]
    assert failing[0]["module"] == "model.layers.1.mlp" and float(failing[0]["rel_l2"]) == pytest.approx(0.05, rel=1e-3)
    assert "max_ratio" in rows[0]
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# llmdiff: DIVERGED")
    assert md.index("first divergence") < md.index("## Summary")
    assert "| model.layers.1.mlp |" in md and "max_ratio" in md
    page = (tmp_path / "r.html").read_text()
    assert "<script src" not in page and "http" not in page.split("</style>")[0]
    assert re.search(r"id='verdict'>DIVERGED<", page)
    embedded = json.loads(re.search(r"id='llmdiff-data'>(.*?)</script>", page).group(1).replace("&quot;", '"'))
    assert embedded["culprit"] == "model.layers.1.mlp"
    assert page.count("<svg") == 2
    assert "model.layers.1.mlp" in page and "0.05" in page


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llmdiff", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_exit_codes_and_outputs(dumps, tmp_path):
    ok = cli("compare", dumps["golden"], dumps["bf16"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "MATCH" in ok.stdout
    bad = cli("compare", dumps["golden"], dumps["fp32_mlp"], "-o", tmp_path / "r.html", "--json", tmp_path / "r.json")
    assert bad.returncode == 1
    assert "DIVERGED" in bad.stdout and "model.layers.1.mlp" in bad.stdout
    assert (tmp_path / "r.html").is_file() and json.loads((tmp_path / "r.json").read_text())["verdict"] == "diverged"
    allclose = cli("compare", dumps["golden"], dumps["golden_again"], "--rtol", "0", "--atol", "0")
    assert allclose.returncode == 0



@pytest.mark.parametrize(("target", "code"), [("bf16", 0), ("fp32_mlp", 1)])
def test_a_reader_that_stops_reading_leaves_the_verdicts_exit_code(dumps, target, code):
    # `llmdiff compare A B | head -1`, its reader gone before the first line is written: the exit code is
    # still the verdict's (not 1 for every run, as rich's default has it, nor 0)
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "llmdiff", "compare", str(dumps["golden"]), str(dumps[target])],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr

@pytest.mark.parametrize(("args", "message"), [
    (["nope", "nope2"], "llmdiff: error: nope: no such dump folder"),
    (["{golden}", "{golden}", "--threshold", "cosine"], "llmdiff: error: --threshold: expected NAME=VALUE"),
    (["{golden}", "{golden}", "--algorithm", "missing.py:f"], "llmdiff: error: --algorithm: no such file missing.py"),
    (["{golden}", "{golden}", "-o", "report.pdf"], "llmdiff: error: -o: cannot tell the format of report.pdf"),
    (["{golden}", "{golden}", "--steps", "5-2"], "llmdiff: error: --steps: range '5-2' runs backwards"),
    (["{golden}", "{golden}", "--metric", "nonsense"], "llmdiff: error: --metric: unknown metric(s) nonsense"),
])
def test_cli_bad_input_is_one_line_exit_2(dumps, args, message):
    result = cli("compare", *[a.format(golden=dumps["golden"]) for a in args])
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def nan_at_step(module, step):
    calls = {"n": -1}

    def hook(mod, args, output):
        calls["n"] += 1
        if calls["n"] == step:
            output = output.clone()
            output[0, -1, 3] = float("nan")
            return output
        return output
    module.register_forward_hook(hook)


def test_a_module_that_turns_finite_inputs_into_nan_is_the_culprit(dumps, tmp_path):
    model = tiny_llama(layers=4)
    nan_at_step(model.model.layers[1].mlp.down_proj, step=2)
    run(model, tmp_path / "nan")
    report = llmdiff.compare(dumps["golden"], tmp_path / "nan")
    assert report.verdict == "diverged"
    fd = report.first_divergence
    assert (fd["step"], fd["module"], fd["part"]) == (2, "model.layers.1.mlp.down_proj", "output")
    top = report.culprits[0]
    assert (top.module, top.step, top.confirmed) == ("model.layers.1.mlp.down_proj", 2, True)
    assert "NaN" in top.reason
    assert all(c.module not in ("model.layers.1.mlp", "model.layers.1") for c in report.culprits)
    assert report.tokens.first_out_of_budget == 2  # non-finite logits are out of budget


def test_a_culprit_within_budget_is_the_first_divergence(dumps, tmp_path):
    # bf16 noise hides a 5% MLP fault from the tensor budgets; localization still finds it, and
    # first_divergence names it rather than saying every tensor is within tolerance next to DIVERGED
    report = llmdiff.compare(dumps["golden"], dumps["bf16_mlp"])
    assert report.verdict == "diverged" and report.culprits[0].confirmed
    fd = report.first_divergence
    assert fd is not None and fd["module"] == report.culprits[0].module and fd["status"] == "culprit"


def test_json_report_holds_what_dataclass_conversion_gives(dumps, tmp_path):
    """The JSON report writes entries field by field (not ``dataclasses.asdict``) and one line each, with orjson:
    it must parse back to exactly what the plain conversion gives, non-finite numbers, integer keys and text
    orjson refuses included."""
    from dataclasses import asdict

    from llmdiff.compare.results import clean

    report = llmdiff.compare(dumps["golden"], dumps["fp32_mlp"])
    entries = report.entries
    entries[0].metrics["cosine"] = float("nan")
    entries[1].error, entries[1].budget = float("inf"), float("-inf")
    entries[2].rank_errors, entries[2].ranks = {0: 1e-7, 1: float("nan")}, [1]
    entries[3].reason = "lone surrogate \udc80 and é"
    report.save(tmp_path / "r.json")
    expected = []
    for entry in entries:
        record = asdict(entry)
        del record["seq"]
        expected.append(clean(record))
    text = (tmp_path / "r.json").read_text(errors="surrogateescape")
    written = json.loads(text)["entries"]
    assert written == json.loads(json.dumps(expected))
    assert written[0]["metrics"]["cosine"] == "nan" and written[2]["rank_errors"] == {"0": 1e-7, "1": "nan"}
    assert (written[1]["error"], written[1]["budget"]) == ("inf", "-inf")  # fields left as they are unless not finite
    assert sum(line.startswith('  {"index":') for line in text.splitlines()) == len(entries)  # one line each
    report.save(tmp_path / "r.csv")  # written from the fields themselves: the same spelling of NaN and Inf
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text(errors="surrogateescape"))))
    assert rows[0]["cosine"] == "nan" and (rows[1]["error"], rows[1]["budget"]) == ("inf", "-inf")
    assert rows[0]["golden_shape"] == "x".join(map(str, entries[0].golden_shape))


@pytest.mark.parametrize("rich_rows", [500, 3])
def test_verbose_lists_every_entry_not_passing(dumps, monkeypatch, rich_rows):
    """``-v`` lists every entry that does not pass with its reason: as a table up to RICH_ROWS rows, beyond
    that as plain aligned columns (a rich table of 29k rows took 22 s to lay out)."""
    from rich.console import Console

    from llmdiff.report import terminal

    monkeypatch.setattr(terminal, "RICH_ROWS", rich_rows)
    report = llmdiff.compare(dumps["golden"], dumps["fp32_mlp"], rtol=1e-9, atol=0.0)
    failing = [e for e in report.entries if e.status != "pass"]
    assert len(failing) > 3
    out = io.StringIO()
    terminal.print_comparison(report.comparison, Console(file=out, width=400, highlight=False), verbose=True)
    text = out.getvalue()
    for e in failing:
        assert any(e.name in line and e.reason in line for line in text.splitlines()), e.name
    if rich_rows == 3:  # plain columns: the header and every row start their columns at the same offsets
        lines = text[text.index("entries not passing"):].splitlines()[1:len(failing) + 2]
        assert "┃" not in text.split("entries not passing")[1] and lines[0].split() == [
            "step", "entry", "status", "rel_l2", "cosine", "max_abs", "reason"]
        status_at = lines[0].index("status")
        assert all(line[status_at:].startswith(("fail", "shape_mismatch", "missing")) for line in lines[1:])
