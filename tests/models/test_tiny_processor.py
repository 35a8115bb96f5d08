"""`mixspec tiny CATALOG_ID`: the catalog has config.json only, so the tokenizer and processor
files are synthesized offline. Oracles: the family's own classes from transformers (AutoProcessor,
its image processor's output, its ``_get_num_multimodal_tokens``), the config's special-token ids,
and the rows train.py's data check encodes (mixspec's own expectation of the row)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixspec.cli import app
from mixspec.models.sources import catalog_ids, catalog_root
from mixspec.models.tiny_processor import WRITERS, processor_name

pytest.importorskip("PIL")


def _families() -> list[str]:
    """One catalog id per model_type whose family has a processor (the smallest file name)."""
    seen = {}
    for model_id in sorted(catalog_ids(), key=len):
        mt = json.loads((catalog_root() / model_id / "config.json").read_text())["model_type"]
        if processor_name(mt) and mt not in seen and "72B" not in model_id:
            seen[mt] = model_id
    return sorted(seen.values())


FAMILIES = _families()


def _config_json(model_id: str) -> dict:
    return json.loads((catalog_root() / model_id / "config.json").read_text())


def _model_type(model_id: str) -> str:
    return _config_json(model_id)["model_type"]


def run(*args, env=None):
    result = CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{catalog id: (tiny dir, CLI stdout, CLI stderr)} for one id per processor family."""
    out = {}
    for model_id in FAMILIES:
        where = tmp_path_factory.mktemp("tiny") / "m"
        code, stdout, stderr = run("tiny", model_id, where)
        assert code == 0, stderr
        out[model_id] = (where, stdout, stderr)
    return out


def _image_token_id(config) -> int:
    return next(getattr(config, k) for k in ("image_token_id", "image_token_index") if hasattr(config, k))


def _processor(where: Path):
    """The family's processor as a user loads it; None (with why) where transformers cannot
    build it here (the Qwen-VL processors need torchvision for their video processor)."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(where), None
    except ImportError as exc:
        return None, str(exc).strip().splitlines()[0].split(". ")[0]


def test_the_catalog_has_processor_families_and_tiny_covers_most():
    assert {_model_type(m) for m in FAMILIES} >= {"llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma"}
    assert all(processor_name(_model_type(m)) in WRITERS for m in FAMILIES)  # every catalog family is covered


@pytest.mark.parametrize("model_id", FAMILIES)
def test_tiny_synthesizes_or_says_what_to_provide(model_id, tiny_dirs):
    where, stdout, stderr = tiny_dirs[model_id]
    assert "Traceback" not in stdout + stderr
    if processor_name(_model_type(model_id)) in WRITERS:
        assert "synthesized" in stdout and "tokenizer.json" in stdout and "NOT the real model's tokenizer" in stdout
        assert (where / "tokenizer.json").is_file()
        assert json.loads((where / "mixspec_tiny.json").read_text())["synthesized"]
    else:
        assert "\nwarning:" in "\n" + stderr and "hint:" in stderr and "processor files" in stderr
        assert not (where / "tokenizer.json").exists() and (where / "model.safetensors").is_file()


@pytest.mark.parametrize("model_id", [m for m in FAMILIES if processor_name(_model_type(m)) in WRITERS])
def test_special_tokens_resolve_to_the_configs_ids(model_id, tiny_dirs):
    import transformers

    where = tiny_dirs[model_id][0]
    config = transformers.AutoConfig.from_pretrained(where)
    tok = transformers.AutoTokenizer.from_pretrained(where)
    text = config.get_text_config()
    assert len(tok) <= text.vocab_size
    image_id = _image_token_id(config)
    processor, _ = _processor(where)
    # the token the image expands to: the tokenizer's own (Gemma 3: its soft token, the processor's
    # image_token being the <start_of_image> marker), else the processor's
    image_token = getattr(tok, "image_token", None) or (processor.image_token if processor else "<|image_pad|>")
    assert tok.convert_tokens_to_ids(image_token) == image_id
    ids = {k: getattr(c, k) for c in (config, text) for k in vars(c)
           if k.endswith(("_token_id", "_token_index")) and isinstance(getattr(c, k), int)}
    assert ids, "the config names no special ids"
    for key, value in ids.items():  # every id the config names is a special token of the tokenizer
        token = tok.convert_ids_to_tokens(value)
        assert token in tok.all_special_tokens or token in tok.get_added_vocab(), (key, value, token)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):  # the roles, where the tokenizer has one
        want = next((getattr(c, key) for c in (config, text) if isinstance(getattr(c, key, None), int)), None)
        if want is not None and getattr(tok, key) is not None:
            assert getattr(tok, key) == want, key
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def _row_image_tokens(where: Path, config, size=(64, 48)) -> tuple[int, int]:
    """(image tokens in the processor's encoding of one image row, the processor's own count
    for that image size)."""
    from PIL import Image

    processor, _ = _processor(where)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    if processor.chat_template is None:  # a prefix LM (PaliGemma): the prompt as its processor takes it
        text = processor.image_token + "What colour?"
    else:
        text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[Image.new("RGB", size, "red")], return_tensors="pt")
    got = int((batch["input_ids"] == _image_token_id(config)).sum())
    return got, processor._get_num_multimodal_tokens(image_sizes=[(size[1], size[0])]).num_image_tokens[0]


@pytest.mark.parametrize("model_id", [m for m in FAMILIES if processor_name(_model_type(m)) in WRITERS])
def test_the_familys_processor_loads_and_encodes_an_image_row(model_id, tiny_dirs, tmp_path):
    import transformers

    where = tiny_dirs[model_id][0]
    config = transformers.AutoConfig.from_pretrained(where)
    image_processor = transformers.AutoImageProcessor.from_pretrained(where)
    vision = config.vision_config
    assert getattr(image_processor, "patch_size", vision.patch_size) == vision.patch_size
    processor, why = _processor(where)
    if processor is None:  # and `mixspec tiny` said so
        assert "warning: AutoProcessor cannot load" in tiny_dirs[model_id][2] and "text rows work" in tiny_dirs[model_id][2]
        pytest.skip(f"transformers cannot build {processor_name(config.model_type)} here: {why}")
    assert type(processor).__name__ == processor_name(config.model_type)
    got, expected = _row_image_tokens(where, config)
    assert got == expected > 0
    if config.model_type == "llava":  # the config's own arithmetic: (image / patch)^2 patches, CLS dropped
        assert got == (vision.image_size // vision.patch_size) ** 2
    report = _data_check(where, tmp_path)
    assert report["images"]["tokens_per_image"]["max"] == got


def _data_check(model: Path, tmp_path: Path) -> dict:
    """mixspec's own expectation of the row: `data check --json` on a spec over the tiny model."""
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    row = {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red."}],
           "images": ["red.png"]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "spec.yaml").write_text(
        f"version: 1\nmodel: {model}\ncomponents:\n  language: {{train: lora, lr: 1.0e-4}}\n"
        f"training: {{max_length: 2048}}\ndata: {{train: {tmp_path / 'train.jsonl'}}}\n")
    code, out, err = run("data", "check", tmp_path / "spec.yaml", "--json", "--workers", "1",
                         env={"MIXSPEC_CACHE_DIR": str(tmp_path / "cache"), **dict(os.environ)})
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("model_id", [m for m in FAMILIES if processor_name(_model_type(m)) in WRITERS
                                      and "spatial_merge_size" in _config_json(m)["vision_config"]])
def test_merging_families_image_processor_follows_the_config(model_id, tiny_dirs):
    """Qwen-VL families (no torchvision needed): the family's image processor patches an image at
    the config's patch/merge sizes, as its own patch count says; each merged token is one image token."""
    import transformers
    from PIL import Image

    where = tiny_dirs[model_id][0]
    vision = transformers.AutoConfig.from_pretrained(where).vision_config
    image_processor = transformers.AutoImageProcessor.from_pretrained(where)
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == \
        (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    out = image_processor(images=[Image.new("RGB", (64, 48), "red")], return_tensors="pt")
    patches = int(out["image_grid_thw"].prod())
    assert patches == image_processor.get_number_of_image_patches(48, 64, {})
    assert patches % vision.spatial_merge_size ** 2 == 0 and patches // vision.spatial_merge_size ** 2 > 0


@pytest.mark.slow
@pytest.mark.parametrize("model_id", FAMILIES)
def test_the_compiled_train_py_trains_on_the_tiny_model(model_id, tiny_dirs, tmp_path):
    """`mixspec compile --target hf` over the tiny model, then train.py for one step on CPU: an image
    row where transformers builds the family's processor here (not Qwen-VL without torchvision),
    else a text row."""
    import subprocess
    import sys

    where = tiny_dirs[model_id][0]
    processor, _ = _processor(where)
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    # an image row where the processor loads (PaliGemma's refuses rows without an image), else a text row
    rows = [{"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red."}],
             "images": ["red.png"]} if processor is not None else
            {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "spec.yaml").write_text(
        f"version: 1\nmodel: {where}\ncomponents:\n  vision: {{train: full, lr: 1.0e-5}}\n"
        f"  language: {{train: lora, lr: 1.0e-4, lora: {{rank: 4, alpha: 8}}}}\n"
        f"training: {{max_length: 2048, max_steps: 1, precision: fp32}}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}}}\noutput_dir: {tmp_path / 'run'}\n")
    code, _, err = run("compile", tmp_path / "spec.yaml", "--target", "hf", "-o", tmp_path / "out")
    assert code == 0, err
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIXSPEC_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(tmp_path / "out" / "train.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{len(rows)} accepted" in done.stdout + done.stderr
    assert (tmp_path / "run" / "final" / "mixspec_plan.json").is_file()


def test_a_local_config_only_dir_gets_synthesized_files_too(tmp_path):
    """A local model dir with config.json and generation_config.json (no tokenizer): the same
    synthesis as for the catalog id, and generation_config.json is copied."""
    import shutil

    import transformers

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(catalog_root() / "llava-hf/llava-1.5-7b-hf/config.json", src / "config.json")
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    code, out, err = run("tiny", src, tmp_path / "tiny")
    assert code == 0, err
    assert "copied from" in out and "generation_config.json" in out and "synthesized" in out
    assert type(transformers.AutoProcessor.from_pretrained(tmp_path / "tiny")).__name__ == "LlavaProcessor"


def test_a_config_the_recipe_does_not_fit_leaves_no_files_and_no_traceback(tmp_path):
    """A LLaVA config whose pad id does not follow the image id (not LLaVA-1.5's layout): the model
    is written, the tokenizer is not (nothing half-written), and the warning says what to provide."""
    src = tmp_path / "src"
    src.mkdir()
    config = json.loads((catalog_root() / "llava-hf/llava-1.5-7b-hf/config.json").read_text())
    config["pad_token_id"] = 5
    (src / "config.json").write_text(json.dumps(config))
    code, out, err = run("tiny", src, tmp_path / "tiny")
    assert code == 0 and "Traceback" not in out + err
    assert "warning:" in err and "hint:" in err and "tokenizer/processor files" in err
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == \
        ["config.json", "generation_config.json", "mixspec_tiny.json", "model.safetensors"]
