"""Round trip through the same backend: `mixspec import -o spec.yaml`, `mixspec compile
--target <that backend>`, `mixspec import` of the compiled file, `mixspec diff` exit 0.

The configs in tests/fixtures/import/ are written in the shape of the backends' own example
scripts and of configs users post (header comments, launcher environment, flags that do not
change what trains); examples/import/swift_sft_full.sh is docs/import.md's. Where the compiled
form is the swift plugin (--tuner_type mixspec), the import reads the Plan back from
mixspec_plugin.py. Where the target cannot run the Plan with its flags, a case names the
refusal it expects (none left), so a gap is never silent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "import"

CASES = [
    # (config, backend, extra compile options, None: same training | the target's refusal)
    ("examples/import/swift_sft_full.sh", "swift", [], None),  # compiled with the plugin
    ("tests/fixtures/import/swift_full_vit_lr.sh", "swift", [], None),  # plugin (fp32 master weights)
    ("tests/fixtures/import/swift_lora_llm_full_vit.sh", "swift", [], None),
    ("tests/fixtures/import/swift_text_lora_expr.sh", "swift", [], None),  # flags only
    ("tests/fixtures/import/swift_rlhf_dpo.sh", "swift", [], None),
    ("tests/fixtures/import/lf_qwen2vl_lora_sft.yaml", "llamafactory", [], None),
    ("tests/fixtures/import/lf_qwen2vl_full_sft.yaml", "llamafactory", [], None),
    ("tests/fixtures/import/lf_webui_preview.sh", "llamafactory", [], None),
    # LLaMA-Factory trains the new tokens' embeddings only as additional_target copies: the
    # import plans them in place, and the target writes the copies under --approximate
    ("tests/fixtures/import/lf_llama3_lora_tokens.yaml", "llamafactory", ["--approximate"], None),
    ("tests/fixtures/import/lf_llama3_freeze.yaml", "llamafactory", [], None),  # freeze tuning
    ("tests/fixtures/import/axolotl_qwen25_lora.yml", "axolotl", [], None),  # lora_target_linear -> a regex
    ("tests/fixtures/import/axolotl_llama_unfrozen.yml", "axolotl", [], None),  # unfrozen_parameters
]
WRITTEN = {"swift": "train.sh", "llamafactory": "train.yaml", "axolotl": "config.yml"}


@pytest.mark.parametrize("config,backend,options,refused", CASES, ids=[Path(c[0]).name for c in CASES])
def test_import_compile_import_trains_the_same(run_cli, tmp_path, config, backend, options, refused):
    spec, again, out = tmp_path / "spec.yaml", tmp_path / "again.yaml", tmp_path / "out"
    first = run_cli("import", "--from", backend, config, "-o", str(spec))
    assert first.exit_code == 0, first.stderr
    compiled = run_cli("compile", str(spec), "--target", backend, "-o", str(out), *options)
    if refused:
        assert compiled.exit_code == 1 and refused in compiled.stderr, compiled.stderr
        return
    assert compiled.exit_code == 0, compiled.stderr
    written = out / WRITTEN[backend]
    second = run_cli("import", "--from", backend, str(written), "-o", str(again))
    assert second.exit_code == 0, second.stderr
    diff = run_cli("diff", str(spec), str(again))
    assert diff.exit_code == 0, diff.stdout


def test_the_plugin_form_is_read_back(tmp_path):
    """A compiled train.sh with --tuner_type mixspec: the Plan comes from mixspec_plugin.py
    (checked by the plugin's own fingerprint); without the plugin file it is a located error."""
    from mixspec.api import plan_spec, render
    from mixspec.importers import read

    plan = plan_spec(ROOT / "examples" / "qwen25vl-7b-mixed.yaml")
    files = render(plan, "swift")
    assert "--tuner_type mixspec" in files["train.sh"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    got = read("swift", files["train.sh"], str(tmp_path / "train.sh"))
    assert got.ok, [p.render() for p in got.problems]
    assert got.plan.fingerprint() == plan.fingerprint()
    assert got.plan.trainable_lrs() == plan.trainable_lrs()
    assert {t for c in got.plan.components if c.lora for t in c.lora.targets} == \
        {t for c in plan.components if c.lora for t in c.lora.targets}
    # an edited plugin no longer gives its own fingerprint: said, never a silent other Plan
    plugin = files["mixspec_plugin.py"]
    i = plugin.index("'lr': ", plugin.index("COMPONENTS = ["))
    j = plugin.index(",", i)
    (tmp_path / "mixspec_plugin.py").write_text(plugin[:i] + "'lr': 0.5" + plugin[j:])
    edited = read("swift", files["train.sh"], str(tmp_path / "train.sh"))
    assert not edited.ok and "does not give its own fingerprint" in edited.problems[0].message
    (tmp_path / "mixspec_plugin.py").unlink()
    gone = read("swift", files["train.sh"], str(tmp_path / "train.sh"))
    assert not gone.ok and "mixspec_plugin.py is not beside the script" in gone.problems[0].message
