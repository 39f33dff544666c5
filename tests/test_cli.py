"""The command line: exit codes, exact one-line messages, nothing written on bad input, fast --help."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmopt import cli


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mmopt", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, mmopt.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mmopt.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "optimize" in result.stdout and "profile" in result.stdout
    assert time.perf_counter() - start < 5     # generous for a loaded CI box; typically ~0.4 s


BAD = {
    "misspelled key": ("model: {source: hf, path: x}\noutputt: o\n", "recipe.yaml:2: outputt: unknown field"),
    "unknown pass": ("model: {source: hf, path: x}\npasses: [{squash: {}}]\noutput: o\n",
                     "recipe.yaml:2: passes[0].squash: unknown pass"),
    "wrong type": ("model: {source: hf, path: x}\nprofile: {batch_size: big}\npasses: [cast]\noutput: o\n",
                   "recipe.yaml:2: profile.batch_size: "),
    "malformed yaml": ("model: {source: hf, path: x\npasses: [cast]\noutput: o\n", "malformed YAML"),
    "missing model path": ("model: {source: hf, path: ./nowhere}\npasses: [cast]\noutput: o\n", "model path: path does not exist"),
    "hub id": ("model: {source: hf, path: bert-base-uncased/main}\npasses: [cast]\noutput: o\n", "not available offline"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_exit_2_with_one_line_and_write_nothing(case, tmp_path, monkeypatch, capsys):
    text, expected = BAD[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "optimize", "recipe.yaml")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and expected in lines[0]
    # one line per problem (a recipe may have several), each with where it is; an optional hint
    assert all(line.startswith(("error: ", "hint: ")) for line in lines) and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_validate_says_ok(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\npasses: [{cast: {dtype: float16}}]\noutput: o\n")
    code, out, err = run_cli(monkeypatch, capsys, "validate", recipe)
    assert code == 0 and out.startswith(f"ok: {recipe} (torchvision model; cast;")


def test_existing_output_needs_force(tmp_path, monkeypatch, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\npasses: [strip]\noutput: o\n")
    code, _, err = run_cli(monkeypatch, capsys, "optimize", recipe)
    assert code == 2 and err.startswith(f"error: output already exists: {tmp_path / 'o'}\nhint: pass --force")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_failed_gate_exits_1_and_still_writes(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\nprofile: {batch_size: 1, image_size: 32}\n"
                      "calibration: {num_samples: 4, batch_size: 2}\npasses: [strip]\ngates: {max_weight_bytes: 1KiB}\n"
                      "output: o\n")
    code, out, _ = run_cli(monkeypatch, capsys, "optimize", recipe, "--json")
    report = json.loads(out)
    assert code == 1 and report["passed"] is False
    assert [(g["gate"], g["part"], g["passed"]) for g in report["gates"]] == [("max_weight_bytes", "all", False)]
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "mmopt.json").is_file()


def test_profile_json(monkeypatch, capsys, tiny_clip_name):
    code, out, _ = run_cli(monkeypatch, capsys, "profile", f"open_clip:{tiny_clip_name}", "--part", "visual",
                           "--batch", "4", "--json")
    result = json.loads(out)
    assert code == 0 and result["method"] == "estimated" and result["random_weights"] is True
    assert result["weights_bytes"] == result["parts"]["visual"]["weights_bytes"] > 0
    assert result["peak_activation_bytes"] > 0 and result["parts"]["visual"]["modules"]


def test_profile_bad_model_is_one_line(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "profile", "hf:/no/such/folder")
    assert code == 2 and err.startswith("error: model path: path does not exist")


# --- command-line usage: click's own errors are usage errors (exit 2), never "internal error" ------------------

@pytest.mark.parametrize("args, says", [
    (["optimize", "x.yaml", "--froce"], "No such option: --froce"),
    (["optimize"], "Missing argument"),
    (["optimise", "x.yaml"], "No such command 'optimise'"),
    (["profile", "open_clip:ViT-B-32", "--batch", "0"], "Invalid value for '--batch'"),
])
def test_usage_errors_exit_2_with_the_usage_line(monkeypatch, capsys, args, says):
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert "Usage:" in err and says in err and "internal error" not in err and "Traceback" not in err


def test_bare_command_shows_help_cleanly(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys)
    assert code == 0 and "optimize" in out and "error" not in err.lower()


def test_version(monkeypatch, capsys):
    from mmopt import __version__

    code, out, _ = run_cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"mmopt {__version__}"


def test_help_documents_every_exit_code(monkeypatch, capsys):
    from mmopt.errors import EXIT_CODES

    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and all(f"{c} {meaning.split()[0]}" in text for c, meaning in EXIT_CODES.items())


@pytest.mark.parametrize("debug", [False, True])
def test_internal_errors_exit_3_never_a_verdict_code(monkeypatch, capsys, tmp_path, debug):
    from mmopt import api

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(api, "validate", broken)
    code, _, err = run_cli(monkeypatch, capsys, *(["--debug"] if debug else []), "validate", tmp_path / "r.yaml")
    assert code == 3
    assert "error: internal error: RuntimeError: something nobody expected" in err
    assert ("Traceback" in err) is debug and ("--debug for the traceback" in err) is not debug


def test_every_recipe_problem_is_reported_with_its_line(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\npasses:\n  - cast: {dtyp: float16}\n"
                      "  - quantize: {method: int3}\noutputt: o\n")
    code, _, err = run_cli(monkeypatch, capsys, "validate", recipe)
    lines = err.strip().splitlines()
    assert code == 2 and all(line.startswith("error: ") for line in lines)
    assert [line.split(": ", 2)[1] for line in lines] == [f"{recipe}:3", f"{recipe}:4", f"{recipe}:5", f"{recipe}:1"]
    assert "passes[0].cast.dtyp: unknown field" in lines[0] and "passes[1].quantize.method" in lines[1]
    assert "outputt: unknown field" in lines[2] and "output: required field is missing" in lines[3]


# --- overrides, dry run, passes, schema ---------------------------------------------------------------------

RESNET = "model: {source: torchvision, name: resnet18}\nprofile: {batch_size: 2, image_size: 32}\n" \
         "calibration: {num_samples: 4, batch_size: 2}\npasses:\n  - cast\noutput: o\n"


def test_set_overrides_values_and_names_itself_in_errors(tmp_path, monkeypatch, capsys):
    from mmopt import api

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RESNET)
    parsed = api.validate(recipe, api.Overrides(values=["passes.0.cast.dtype=bfloat16", "passes.1.strip.features=true",
                                                       "profile.batch_size=3"], output="elsewhere"))
    assert [(p.name, p.config.model_dump()) for p in parsed.passes] == [
        ("cast", {"dtype": "bfloat16", "parts": None}), ("strip", {"keep": None, "heads": True, "features": True})]
    assert parsed.profile.batch_size == 3 and parsed.output_path == (Path.cwd() / "elsewhere").resolve()
    code, _, err = run_cli(monkeypatch, capsys, "validate", recipe, "--set", "passes.0.cast.dtype=int3")
    assert code == 2 and err.startswith("error: --set passes.0.cast.dtype=int3: passes[0].cast.dtype: Input should be")
    for bad, says in (("passes.7.cast.dtype=float16", "passes is a list of 1"), ("nokey", "expected KEY=VALUE"),
                      ("output.x=1", "output is 'o', which has no 'x'")):
        code, _, err = run_cli(monkeypatch, capsys, "validate", recipe, "--set", bad)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RESNET)
    code, out, _ = run_cli(monkeypatch, capsys, "optimize", recipe, "--dry-run", "--json",
                           "--set", "passes.1.strip.features=true")
    plan = json.loads(out)
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
    assert [p["name"] for p in plan["passes"]] == ["cast", "strip"] and plan["output_exists"] is False
    visual = plan["parts"]["visual"]
    import torchvision

    state = torchvision.models.resnet18().state_dict().values()
    assert visual["weight_bytes"] == sum(t.numel() * t.element_size() for t in state)
    assert visual["params"] == 11_689_512 and visual["peak_activation_bytes"] > 0
    assert "latency_ms" not in visual and plan["random_weights"] is True


def test_passes_lists_every_pass_with_its_options(monkeypatch, capsys):
    from mmopt import registry

    code, out, _ = run_cli(monkeypatch, capsys, "passes")
    assert code == 0 and all(name in out for name in registry.PASSES)
    code, out, _ = run_cli(monkeypatch, capsys, "passes", "quantize")
    assert code == 0 and "method" in out and "prune" not in out
    assert all(method in out for method in ("int4", "llm_int8", "nf4", "fp4"))
    code, _, err = run_cli(monkeypatch, capsys, "passes", "squash")
    assert code == 2 and err.startswith("error: no pass named 'squash'")


def test_schema_accepts_every_shipped_recipe_and_rejects_typos(monkeypatch, capsys):
    import jsonschema
    import yaml

    code, out, _ = run_cli(monkeypatch, capsys, "schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "mmopt recipe"
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    for bad in ({"model": {"source": "hf", "path": "x"}, "output": "o", "passes": [{"cast": {"dtyp": "float16"}}]},
                {"model": {"source": "hf", "path": "x"}, "output": "o", "passes": ["squash"]},
                {"model": {"source": "hf", "path": "x"}, "outputt": "o", "passes": ["cast"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    jsonschema.validate({"model": {"source": "hf", "path": "x"}, "output": "o", "passes": ["cast"],
                         "gates": {"max_weight_bytes": "200MiB"}}, schema)


# --- what a CI log sees: plain progress lines, third-party warnings summarised ------------------------------------

def test_plain_progress_prints_at_intervals_with_stage_step_and_fields():
    import io

    from mmopt.report import PlainProgress

    stream = io.StringIO()
    progress = PlainProgress(stream, interval=0.0)
    with progress.task("pass substitute"):
        with progress.task("distilling text", total=400) as task:
            task.advance(120, loss=0.01234, held_out=0.91)
    lines = stream.getvalue().splitlines()
    assert lines[-1].endswith("pass substitute > distilling text: 120/400, loss 0.01234, held out 0.91")
    assert lines[-1].startswith("[00:00] ")
    quiet = io.StringIO()
    with PlainProgress(quiet, interval=3600).task("loading model"):
        pass
    assert quiet.getvalue() == ""


def test_third_party_warnings_are_summarised_once(capsys, monkeypatch):
    import logging
    import warnings

    from mmopt.warnings_filter import quiet_third_party

    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)   # earlier tests' libraries may raise it

    with quiet_third_party():
        for _ in range(300):
            logging.getLogger("bitsandbytes.autograd").warning("MatMul8bitLt: inputs will be cast")
        logging.getLogger("transformers.modeling_utils").error("a real error still shows")
        warnings.warn_explicit("odd", UserWarning, "/x/site-packages/torch/nn/f.py", 1)
    err = capsys.readouterr().err.splitlines()
    assert err == ["transformers.modeling_utils: a real error still shows",
                   "note: 300 warnings from bitsandbytes hidden (first: 'MatMul8bitLt: inputs will be cast'); "
                   "--verbose shows them",
                   "note: 1 warning from torch hidden (first: 'odd'); --verbose shows them"]
    assert logging.getLogger("bitsandbytes").handlers == [] and logging.getLogger("bitsandbytes").propagate


def test_a_handler_a_library_installs_while_held_is_held_too(capsys, monkeypatch):
    """torch adds its own stderr handler to the ``torch`` logger when it is imported, which mmopt does lazily, after
    the warnings were taken over; torchao's import then logs through it."""
    import logging
    import sys

    from mmopt.warnings_filter import quiet_third_party

    logger = logging.getLogger("torch")
    monkeypatch.setattr(logger, "handlers", [])
    late = logging.StreamHandler(sys.stderr)
    with quiet_third_party():
        logger.addHandler(late)               # what importing torch does
        logging.getLogger("torch.utils._pytree").warning("a warning of torch's own")
        logging.getLogger("torch.utils._pytree").warning("<enum 'X'> ... register_constant() on Enum subclasses is "
                                                         "deprecated")
    assert capsys.readouterr().err.splitlines() == [
        "note: 1 warning from torch hidden (first: \"a warning of torch's own\"); --verbose shows them"]
    assert late.filters == []                 # restored afterwards


def test_validate_reports_every_problem_found_without_weights(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    """Parts the family lacks (recipe, pass options, gates) and an output that is a file: one line each, with
    file:line: key, all at once and without loading the model."""
    (tmp_path / "taken").write_text("a file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: hf, path: {tiny_bert_dir}}}\n"
                      "passes:\n"
                      "  - cast: {parts: [visual]}\n"
                      "  - strip: {keep: [text, visual]}\n"
                      "gates: {parts: {visual: {min_cosine: 0.9}}}\n"
                      "output: taken\n")
    code, _, err = run_cli(monkeypatch, capsys, "validate", recipe)
    assert code == 2
    assert err.splitlines() == [
        f"error: {recipe}:6: output: output path is a file, not a folder: {tmp_path / 'taken'}",
        f"error: {recipe}:3: passes[0].cast.parts[0]: this model has no part 'visual'; it has: text",
        f"error: {recipe}:4: passes[1].strip.keep[1]: this model has no part 'visual'; it has: text",
        f"error: {recipe}:5: gates.parts.visual: this model has no part 'visual'; it has: text"]


def test_validate_checks_a_swapped_in_model_too(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\n"
                      "passes:\n  - substitute: {swap: {source: hf, path: ./no_student}}\noutput: o\n")
    code, _, err = run_cli(monkeypatch, capsys, "validate", recipe)
    assert code == 2 and err.startswith(f"error: {recipe}:3: passes[0].substitute.swap: model path: path does not "
                                        f"exist: {tmp_path / 'no_student'}")
