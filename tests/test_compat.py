"""The oldest transformers we claim (pyproject.toml's floor) against the project's: exports load with the same
logits, processors give the same pixels, prompts and generations, towers the same fingerprints and features,
and the trainer runs on the floor with the same losses.

The floor is installed once beside the project's environment (``devtools/transformers_floor.py``: pip
``--target`` into a cache folder, never into the environment) and driven in one subprocess running
``tests/compat_probe.py``; the project's version runs the same probe in-process. The test is skipped only
when that install is impossible (no package registry), with the reason. About 40 s, most of it the floor's
import; it stays in the default suite because the floor it checks is a promise every install relies on.

Exports checked: a finetuned tiny-llm (tied head, rope theta 1e4) + tiny-clip run in fp32 and bf16, and a
Qwen2-style LLM with an untied head and rope theta 1e6 (what hides a wrong rope or a lost head: 4.x would
silently fall back to theta 1e4) + tiny-siglip whose shards padded images to square.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import compat_probe
from tests.launching import VOLATILE
from tests.test_trainer_export import our_logits
from trainer.cli import main
from visalign.shards import EncoderInfo, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--batch-size", "2", "--logging.progress", "false", "--logging.report-to", "none", "--lr", "1e-2"]


def floor_tools():
    spec = importlib.util.spec_from_file_location(
        "transformers_floor", ROOT / "devtools" / "transformers_floor.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def floor_site():
    tools = floor_tools()
    try:
        return tools, tools.install()
    except RuntimeError as err:
        pytest.skip(
            f"the transformers floor {tools.FLOOR['transformers']} could not be installed ({err}); "
            "run `python devtools/transformers_floor.py install` where the package registry is reachable"
        )


def test_declared_floor_is_the_tested_version():
    text = (ROOT / "pyproject.toml").read_text()
    floor = floor_tools().FLOOR
    assert re.search(r'"transformers>=([\d.]+)"', text).group(1) == floor["transformers"]
    tokenizers = re.search(r'"tokenizers>=([\d.]+)"', text).group(1)
    assert floor["tokenizers"].startswith(tokenizers)  # the floor's tokenizers satisfies the declared range


def write_photo(path: Path) -> Path:
    import skimage.data
    from PIL import Image

    Image.fromarray(skimage.data.astronaut()).resize((300, 200)).save(path, quality=92)  # not square
    return path


def tiny_qwen2(folder: Path, tokenizer_folder: str) -> Path:
    """A 2-layer Qwen2 causal LM with an untied head and rope theta 1e6, with the tiny-llm tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from trainer.models.portable import portable_tokenizer_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    portable_tokenizer_config(folder)
    return folder


def labelled_shards(tiny_shards, encoder, **info_changes) -> Path:
    root = tiny_shards(num_samples=4, samples_per_shard=2, P=encoder.num_patches, D=encoder.feature_dim)
    manifest = read_manifest(root)
    manifest.encoder = EncoderInfo(**{**encoder.info(-2), **info_changes})
    write_manifest(root, manifest)
    return root


def expand2square(image, colour):
    from PIL import Image

    w, h = image.size
    canvas = Image.new("RGB", (max(w, h), max(w, h)), tuple(colour))
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


@pytest.fixture(scope="module")
def both(floor_site, tmp_path_factory, cache_dir):
    """Runs, exports and towers made with the project's transformers; the probe's results in both versions."""
    from pipeline.encoders import load_encoder
    from trainer.models.llm import resolve_llm

    tools, site = floor_site
    tmp = tmp_path_factory.mktemp("compat")
    counter = iter(range(100))

    def tiny_shards(**kw):
        from tests.conftest import write_tiny_shards

        return write_tiny_shards(tmp / f"shards{next(counter)}", **kw)

    clip = load_encoder("tiny-clip", backend="hf")
    siglip = load_encoder("tiny-siglip", backend="hf")
    photo = write_photo(tmp / "astronaut.jpg")

    shards_a = labelled_shards(tiny_shards, clip)
    train_a = [
        "run",
        "--shards",
        str(shards_a),
        "--llm",
        "tiny-llm",
        "--stage",
        "finetune",
        "--objective",
        "sea",
    ]
    train_a += [*COMMON, "--max-steps", "2"]
    assert main([*train_a, "--output", str(tmp / "run-a")]) == 0
    assert main(["export", str(tmp / "run-a"), "--out", str(tmp / "a")]) == 0
    assert main(["export", str(tmp / "run-a"), "--out", str(tmp / "a16"), "--dtype", "bf16"]) == 0

    qwen = tiny_qwen2(tmp / "qwen2", resolve_llm("tiny-llm"))
    pad = [int(255 * m) for m in siglip.preprocess_spec.mean]
    shards_b = labelled_shards(
        tiny_shards,
        siglip,
        preprocess={**siglip.preprocess_spec.to_dict(), "aspect": "pad", "pad_color": pad},
    )
    train_b = ["run", "--shards", str(shards_b), "--llm", str(qwen), *COMMON, "--max-steps", "1"]
    assert main([*train_b, "--output", str(tmp / "run-b")]) == 0
    assert main(["export", str(tmp / "run-b"), "--out", str(tmp / "b")]) == 0

    exports = [{"name": n, "folder": str(tmp / n), "image": str(photo)} for n in ("a", "a16", "b")]
    towers = [{"name": "tiny-clip", "folder": clip.path}, {"name": "tiny-siglip", "folder": siglip.path}]
    floor_job = {
        "commands": [
            {"name": "train", "argv": [*train_a, "--output", str(tmp / "run-floor")]},
            {
                "name": "export",
                "argv": ["export", str(tmp / "run-floor"), "--out", str(tmp / "floor-export")],
            },
        ],
        "towers": towers,
        "exports": exports,
    }
    (tmp / "job.json").write_text(json.dumps(floor_job))
    env = tools.env(site)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VISALIGN_CACHE=str(cache_dir))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compat_probe.py"), str(tmp / "job.json"), str(tmp / "floor")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    floor_seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    floor = json.loads((tmp / "floor.json").read_text()), dict(np.load(tmp / "floor.npz"))
    current = compat_probe.run_job({"towers": towers, "exports": exports})
    print(f"\nfloor transformers {floor[0]['transformers']} subprocess: {floor_seconds:.1f} s")
    return {"tmp": tmp, "floor": floor, "current": current, "clip": clip, "siglip": siglip, "photo": photo}


def ok(report: dict, section: str, name: str) -> dict:
    entry = report[section][name]
    failed = isinstance(entry, dict) and "error" in entry
    assert not failed, f"{report['transformers']} {section} {name}: {failed and entry.get('traceback')}"
    return entry


def test_exports_load_identically_in_the_floor_and_the_current_version(both):
    (floor, floor_arrays), (current, current_arrays) = both["floor"], both["current"]
    assert floor["transformers"] == floor_tools().FLOOR["transformers"] and current["transformers"] >= "5"
    expected = {"a": (True, 1e4), "a16": (True, 1e4), "b": (False, 1e6)}
    for name, (tied, theta) in expected.items():
        old, new = ok(floor, "exports", name), ok(current, "exports", name)
        for report in (old, new):
            assert report["missing"] == [] and report["unexpected"] == []  # every weight read, none dropped
            assert (report["tied"], report["rope_theta"]) == (tied, theta)
            assert report["processor"][0] == "LlavaProcessor" and report["input_names"] == [
                "attention_mask", "input_ids", "pixel_values"
            ]  # fmt: skip
        assert old["image_token_index"] == new["image_token_index"]
        for key in ("logits", "text_logits"):
            diff = np.abs(floor_arrays[f"{name}.{key}"] - current_arrays[f"{name}.{key}"]).max()
            scale = np.abs(current_arrays[f"{name}.{key}"]).max()
            print(f"{name}: {key} max|floor - current| = {diff:.3g} (logits up to {scale:.3g})")
            assert diff <= 1e-5 and scale > 0.1
        # the same prompt from strings and from content lists, in both versions
        assert old["chat"] == new["chat"] and new["chat"]["list"] == new["chat"]["string"]
        assert new["chat"]["tokenizer_list"] == new["chat"]["list"]
        np.testing.assert_array_equal(floor_arrays[f"{name}.input_ids"], current_arrays[f"{name}.input_ids"])
        np.testing.assert_allclose(
            floor_arrays[f"{name}.pixel_values"], current_arrays[f"{name}.pixel_values"], atol=1e-6
        )
        default_gap = np.abs(
            current_arrays[f"{name}.pixel_values_default"] - current_arrays[f"{name}.pixel_values"]
        ).max()
        assert default_gap < 0.05  # the torchvision backend: within about one grey level
        print(f"{name}: pixels floor == current (PIL); current default backend within {default_gap:.3g}")
        np.testing.assert_array_equal(floor_arrays[f"{name}.generated"], current_arrays[f"{name}.generated"])
        print(
            f"{name}: generate on {both['photo'].name} through AutoProcessor + content-list chat: "
            f"floor {old['generated_text']!r} == current {new['generated_text']!r}; "
            f"ids {current_arrays[f'{name}.generated'].tolist()}"
        )


def test_processor_pixels_are_the_shards_preprocessing(both):
    """Pixels from a raw (non-square) photo equal what the pipeline fed the tower: CLIP resize + centre
    crop for a; LLaVA's pad-to-square, then SigLIP's resize, for b."""
    from PIL import Image

    (_, floor_arrays), (_, current_arrays) = both["floor"], both["current"]
    image = Image.open(both["photo"]).convert("RGB")
    clip, siglip = both["clip"], both["siglip"]
    expected = {
        "a": clip.preprocess(image),
        "b": siglip.preprocess(expand2square(image, [int(255 * m) for m in siglip.preprocess_spec.mean])),
    }
    for name, pixels in expected.items():
        for arrays in (floor_arrays, current_arrays):
            np.testing.assert_allclose(arrays[f"{name}.pixel_values"][0], pixels.numpy(), atol=1e-5)


def test_towers_have_one_fingerprint_and_the_same_features(both):
    (floor, floor_arrays), (current, current_arrays) = both["floor"], both["current"]
    for name, encoder in (("tiny-clip", both["clip"]), ("tiny-siglip", both["siglip"])):
        old, new = ok(floor, "towers", name), ok(current, "towers", name)
        assert old["fingerprint"] == new["fingerprint"] == encoder.fingerprint()
        assert old["pipeline_fingerprint"] == new["pipeline_fingerprint"] == encoder.fingerprint()
        diff = np.abs(floor_arrays[f"{name}.feats"] - current_arrays[f"{name}.feats"]).max()
        print(
            f"{name}: fingerprint {encoder.fingerprint()[:16]} in both; layer -2 features max|diff| {diff:.3g}"
        )
        assert diff <= 1e-6


def test_trainer_runs_and_exports_on_the_floor(both):
    """The same training command under the floor: the same logged losses step by step; its export (written
    by the floor) loads in the current version with the logits of the run's own model."""
    from transformers import LlavaForConditionalGeneration

    from trainer.models.build import load_trained

    floor, _ = both["floor"]
    assert ok(floor, "commands", "train") == 0 and ok(floor, "commands", "export") == 0
    tmp = both["tmp"]

    def records(run):
        lines = (tmp / run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k not in VOLATILE} for ln in lines]

    theirs, ours = records("run-floor"), records("run-a")
    assert [r["step"] for r in theirs] == [1, 2] and set(theirs[0]) == set(ours[0])
    for old, new in zip(theirs, ours):
        for key, value in new.items():
            assert old[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    print("floor run log.jsonl == current run log.jsonl:", {k: round(v, 6) for k, v in theirs[-1].items()})

    hf = LlavaForConditionalGeneration.from_pretrained(tmp / "floor-export", dtype=torch.float32).eval()
    reference = LlavaForConditionalGeneration.from_pretrained(tmp / "a", dtype=torch.float32).eval()
    ids, pixels, _ = compat_probe.fixed_inputs(hf.config)
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(
            logits, reference(input_ids=ids, pixel_values=pixels).logits, atol=1e-5, rtol=0
        )
    loaded = load_trained(tmp / "run-floor", with_objectives=False)
    image_id = hf.config.image_token_index
    mine = our_logits(loaded.vlm, loaded.tokenizer, both["clip"], ids, pixels, image_id)
    torch.testing.assert_close(logits[..., : mine.shape[-1]], mine, atol=1e-4, rtol=1e-4)
    assert (tmp / "floor-export" / "README.md").is_file()
    # the floor wrote the same processor files: one prompt from strings and content lists, no token_type_ids
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tmp / "floor-export")
    as_list = processor.apply_chat_template(compat_probe.LIST_CHAT, add_generation_prompt=True)
    assert as_list == processor.apply_chat_template(compat_probe.STRING_CHAT, add_generation_prompt=True)
    assert as_list == both["current"][0]["exports"]["a"]["chat"]["list"]
    config = json.loads((tmp / "floor-export" / "tokenizer_config.json").read_text())
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
