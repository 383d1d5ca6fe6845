"""convert_weights.py: hub-layout checkpoints written by diffusers/transformers `save_pretrained` load into our
modules and convert to one file, every tensor identical to the source (after the stated dtype cast).

No tolerance anywhere here: loading and converting copy tensors, so equality is exact (a cast to fp16/bf16 is
compared with the same cast of the source tensor).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from conftest import ROOT, reference_pipeline, save_hub_checkpoint
from safetensors.torch import load_file, save_file

import cli
import convert_weights as cw


def source_tensors(folder, name, variant=None):
    comp = cw.COMPONENTS[name]
    return load_file(cw.weights_file(Path(folder) / name, comp.weights, variant))


def assert_same_tensors(ckpt, folder, variant=None, dtype=None):
    """Every tensor of every model equals the hub file's (cast to `dtype` when given), with the same dtype."""
    n = 0
    for name in cw.COMPONENTS:
        ours = getattr(ckpt, name).state_dict()
        src = source_tensors(folder, name, variant)
        src = {k: v for k, v in src.items() if k not in cw.COMPONENTS[name].ignored}
        assert sorted(ours) == sorted(src), name
        for k, t in src.items():
            expected = t.to(dtype) if dtype else t
            assert ours[k].dtype == expected.dtype and torch.equal(ours[k], expected), f"{name}.{k}"
            n += 1
    # the tensors are not all alike (a loader filling everything with one source tensor would fail above,
    # but a test of constants would not)
    assert n > 100 or "tiny" in str(folder)
    return n


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory, tiny_tokenizer_dir):
    pipe = reference_pipeline("tiny", tiny_tokenizer_dir, seed=5)
    return save_hub_checkpoint(pipe, tmp_path_factory.mktemp("hub") / "amused-tiny", tiny_tokenizer_dir, fp16_variant=True)


# ----------------------------------------------------------------------------------------------------
# Loading and converting


def test_full_size_hub_folder_loads_converts_and_loads_back(full_hub_256, tmp_path):
    import clip_text
    import uvit
    import vqgan

    ckpt = cw.load_hub_folder(full_hub_256)
    assert ckpt.transformer.cfg == uvit.PRESETS["amused-256"]
    assert ckpt.vqvae.cfg == vqgan.PRESETS["amused"]
    assert ckpt.text_encoder.cfg == clip_text.PRESETS["clip-vit-large-patch14"]
    assert (ckpt.mask_token_id, ckpt.masking_schedule) == (8255, "cosine")
    assert assert_same_tensors(ckpt, full_hub_256) == 197 + 277 + 474
    del ckpt

    out = tmp_path / "amused-256.safetensors"
    summary = cw.convert(full_hub_256, out, torch.bfloat16)
    assert summary["transformer"] == (474, 603_537_664)
    assert summary["vqvae"] == (277, 146_244_675)
    assert summary["text_encoder"] == (197, 123_650_304)
    back = cw.load_checkpoint(out)  # one file is a complete model
    assert_same_tensors(back, full_hub_256, dtype=torch.bfloat16)
    assert back.transformer.cfg == uvit.PRESETS["amused-256"] and back.mask_token_id == 8255
    prompts = ["a photo of a cat!", "an astronaut " * 60]  # the second is over 77 tokens
    ref_tok = clip_text.CLIPTokenizer.from_folder(full_hub_256 / "tokenizer")
    with pytest.warns(UserWarning):
        assert torch.equal(back.tokenizer(prompts), ref_tok(prompts))


def test_full_size_fp16_variant(full_hub_256, tmp_path):
    ckpt = cw.load_hub_folder(full_hub_256, variant="fp16")
    assert_same_tensors(ckpt, full_hub_256, variant="fp16")
    del ckpt
    out = tmp_path / "amused-256-fp16.safetensors"
    cw.convert(full_hub_256, out, torch.float16, variant="fp16")
    assert_same_tensors(cw.load_checkpoint(out), full_hub_256, variant="fp16")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cli_converts_tiny_checkpoint(tiny_hub, tmp_path, dtype):
    out = tmp_path / "tiny.safetensors"
    r = run_cli(tiny_hub, "-o", out, "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    assert "transformer" in r.stdout and "parameters" in r.stdout and str(cli.DTYPES[dtype])[6:] in r.stdout
    assert_same_tensors(cw.load_checkpoint(out), tiny_hub, dtype=cli.DTYPES[dtype])
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' 0600


def test_converted_file_keeps_the_tokenizer_and_scheduler(tiny_hub, tmp_path):
    out = tmp_path / "tiny.safetensors"
    cw.convert(tiny_hub, out)
    ckpt = cw.load_checkpoint(out)
    original = cw.load_hub_folder(tiny_hub)
    prompts = ["a photo of a cat!", "", "Ünïcode 東京 🎉"]
    assert torch.equal(ckpt.tokenizer(prompts), original.tokenizer(prompts))
    assert (ckpt.tokenizer.pad_id, ckpt.mask_token_id, ckpt.masking_schedule) == (0, 71, "cosine")


def test_nothing_half_written_when_saving_fails(tiny_hub, tmp_path, monkeypatch):
    out = tmp_path / "tiny.safetensors"

    def failing_save(tensors, path, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cw, "save_file", failing_save)
    with pytest.raises(cw.CheckpointError, match="No space left"):
        cw.convert(tiny_hub, out)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# Loading in another dtype: cast as each tensor is read, never staged in the file's dtype


@pytest.mark.parametrize("source, dtype", [("hub", torch.bfloat16), ("fp32 file", torch.bfloat16),
                                           ("bf16 file", None), ("bf16 file", torch.bfloat16)])
def test_loading_casts_to_the_dtype_asked_for(tiny_hub, tmp_path, source, dtype):
    """Every floating tensor ends in bf16, equal to the fp32 source tensor cast: asked for (dtype), or as the bf16
    file stores it (None: no upcast)."""
    path = tiny_hub
    if source != "hub":
        path = tmp_path / "tiny.safetensors"
        cw.convert(tiny_hub, path, torch.bfloat16 if source == "bf16 file" else None)
    ckpt = cw.load_checkpoint(path, dtype=dtype)
    assert_same_tensors(ckpt, tiny_hub, dtype=torch.bfloat16)  # parameters and buffers: the models have no others


def test_a_cast_keeps_integer_tensors(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"weight": torch.randn(3, 4), "half": torch.randn(2).bfloat16(), "ids": torch.arange(5)}, path)
    sd = cw.read_safetensors(path, torch.bfloat16)
    assert [sd[k].dtype for k in ("weight", "half", "ids")] == [torch.bfloat16, torch.bfloat16, torch.int64]
    assert torch.equal(sd["ids"], torch.arange(5))


# A U-ViT of ~72M parameters (275 MiB in fp32): large enough that the weights, not the interpreter, decide how much
# the RSS grows while loading; its largest tensor (the GEGLU input projection, 22 MiB) is a twelfth of it.
MEDIUM_UVIT = dict(hidden_size=1024, num_hidden_layers=3, intermediate_size=2816, num_attention_heads=16)

# In a fresh interpreter: the growth of the peak RSS over a load in bf16 (bytes), and the bytes of bf16 weights
# loaded. The baseline is taken after the imports, so the interpreter and torch are not counted; nor is
# torch._dynamo imported (70 MB; see convert_weights.SkipNormalInit). VmHWM, not ru_maxrss: Linux starts a
# child's ru_maxrss at its parent's peak (here pytest's, which is larger).
MEASURE_LOAD = """
import sys, torch
import convert_weights as cw
def peak_rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
before = peak_rss()
ckpt = cw.load_checkpoint(sys.argv[1], dtype=torch.bfloat16)
growth = peak_rss() - before
loaded = [t for name in cw.COMPONENTS for t in getattr(ckpt, name).state_dict().values()]
assert all(t.dtype == torch.bfloat16 for t in loaded)
assert "torch._dynamo" not in sys.modules
print(growth, sum(t.nbytes for t in loaded))
"""


@pytest.fixture(scope="module")
def medium_checkpoint(tiny_hub, tmp_path_factory):
    """The tiny hub folder with a MEDIUM_UVIT transformer of random fp32 weights, and its fp32 and bf16 conversions."""
    import uvit

    folder = shutil.copytree(tiny_hub, tmp_path_factory.mktemp("medium") / "hub")
    part = folder / "transformer"
    (part / "diffusion_pytorch_model.fp16.safetensors").unlink()  # the tiny one's; it no longer fits the config
    config = json.loads((part / "config.json").read_text())
    (part / "config.json").write_text(json.dumps({**config, **MEDIUM_UVIT}))
    torch.manual_seed(0)
    save_file(uvit.UViT(cw.hub_config(part, cw.COMPONENTS["transformer"])).state_dict(),
              part / "diffusion_pytorch_model.safetensors")
    files = {"hub": folder, "fp32 file": folder.parent / "fp32.safetensors",
             "bf16 file": folder.parent / "bf16.safetensors"}
    cw.convert(folder, files["fp32 file"])
    cw.convert(folder, files["bf16 file"], torch.bfloat16)
    return files


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux's /proc")
@pytest.mark.parametrize("source", ["hub", "fp32 file", "bf16 file"])
def test_loading_in_bf16_never_holds_the_fp32_weights(medium_checkpoint, source):
    """Cast as read, the RSS grows by the bf16 weights (W/2, for W bytes of fp32 weights) plus one fp32 tensor
    (W/12 here) at a time. Staged in fp32 first (safetensors.load_file, then .to), it grows by at least W: the
    file's pages stay mapped until its last tensor is freed, so all of them are resident beside the casts (1.5 W).
    The bound W/2 + W/4 leaves room for the largest tensor and the allocator, and none for a staging copy. A bf16
    file has nothing to cast: its tensors view the mapped file, and nothing is read before it is used."""
    files = medium_checkpoint["hub"].glob("*/*.safetensors")
    fp32 = sum(f.stat().st_size for f in files if ".fp16." not in f.name)  # W; the headers are a few KiB
    r = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(medium_checkpoint[source])], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    growth, bf16 = map(int, r.stdout.split())
    print(f"{source}: fp32 weights {fp32 / 2**20:.0f} MiB, loaded {bf16 / 2**20:.0f} MiB of bf16, "
          f"peak RSS growth {growth / 2**20:.0f} MiB")
    assert abs(bf16 - fp32 / 2) < 0.01 * fp32  # every weight was loaded
    if source == "bf16 file":  # 12-15 MiB measured: the models' Python objects, not the weights (140 MiB)
        assert growth < 0.25 * bf16
    else:
        assert bf16 * 0.9 < growth < 0.75 * fp32  # the lower bound: the measure is not vacuous


# ----------------------------------------------------------------------------------------------------
# Download, against a stand-in for the hub on 127.0.0.1 (huggingface_hub honours HF_ENDPOINT)

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def serve_hub(repos: dict[str, Path]):
    """The four routes snapshot_download uses: repo info, file tree, and HEAD/GET of a file."""
    requested = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body: bytes, headers=(), status=200, send_body=True):
            self.send_response(status)
            for k, v in (*headers, ("Content-Length", str(len(body)))):
                self.send_header(k, v)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def handle_any(self, send_body):
            path = unquote(urlparse(self.path).path)
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:  # /api/models/{owner}/{name}/(revision|tree)/{rev}
                repo, kind = "/".join(parts[2:4]), parts[4]
                if repo not in repos:
                    return self.reply(b"{}", [("X-Error-Code", "RepositoryNotFound")], 404, send_body)
                files = sorted(p for p in repos[repo].rglob("*") if p.is_file())
                rel = [str(p.relative_to(repos[repo])) for p in files]
                if kind == "tree":
                    body = [{"type": "file", "path": r, "size": p.stat().st_size, "oid": hashlib.sha1(r.encode()).hexdigest()}
                            for r, p in zip(rel, files)]
                else:
                    body = {"id": repo, "sha": FAKE_COMMIT, "siblings": [{"rfilename": r} for r in rel]}
                return self.reply(json.dumps(body).encode(), [("Content-Type", "application/json")], 200, send_body)
            repo, rel = "/".join(parts[:2]), "/".join(parts[4:])  # /{owner}/{name}/resolve/{rev}/{file}
            f = repos.get(repo, Path("/nonexistent")) / rel
            if not f.is_file():
                return self.reply(b"", [("X-Error-Code", "EntryNotFound")], 404, send_body)
            requested.append(rel)
            data = f.read_bytes()
            self.reply(data, [("X-Repo-Commit", FAKE_COMMIT), ("ETag", f'"{hashlib.sha256(data).hexdigest()}"')], 200, send_body)

        def do_HEAD(self):
            self.handle_any(False)

        def do_GET(self):
            self.handle_any(True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requested


def hub_env(tmp_path, port):
    return {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_cli_downloads_a_repo_id_from_the_hub(tiny_hub, tmp_path):
    server, requested = serve_hub({"amused/amused-tiny": tiny_hub})
    try:
        out = tmp_path / "tiny.safetensors"
        r = run_cli("amused/amused-tiny", "-o", out, "--variant", "fp16", env=hub_env(tmp_path, server.server_port))
        assert r.returncode == 0, r.stderr
        # only the chosen variant's weights were fetched, and they landed in huggingface_hub's cache
        weights = sorted({f for f in requested if f.endswith(".safetensors")})  # HEAD then GET
        assert weights == ["text_encoder/model.fp16.safetensors", "transformer/diffusion_pytorch_model.fp16.safetensors",
                           "vqvae/diffusion_pytorch_model.fp16.safetensors"]
        assert any((tmp_path / "hf-home").rglob("model.fp16.safetensors"))
        assert_same_tensors(cw.load_checkpoint(out), tiny_hub, variant="fp16")
        r = run_cli("amused/no-such-repo", "-o", out, env=hub_env(tmp_path, server.server_port))
        assert r.returncode == 2 and "amused/no-such-repo: could not download" in r.stderr
    finally:
        server.shutdown()


def test_cli_without_network_says_how_to_get_the_weights(tmp_path):
    env = hub_env(tmp_path, 9)  # port 9 (discard): nothing listens, the connection is refused
    r = run_cli("amused/amused-256", "-o", tmp_path / "x.safetensors", env=env)
    assert r.returncode == 2, r.stderr
    assert "could not download" in r.stderr and "hf download amused" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the problem, exit code 2, no traceback, nothing at OUT


def broken_copy(tiny_hub, tmp_path, how):
    folder = shutil.copytree(tiny_hub, tmp_path / "broken")
    if how == "missing folder":
        shutil.rmtree(folder)
    elif how == "missing component":
        shutil.rmtree(folder / "vqvae")
    elif how == "truncated weights":
        f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
    elif how == "corrupt config":
        (folder / "vqvae" / "config.json").write_text("{ not json")
    elif how == "512 config on 256 weights":
        config = json.loads((folder / "transformer" / "config.json").read_text())
        config.update(downsample=False, upsample=False)  # our tiny reference has down/upsampling
        (folder / "transformer" / "config.json").write_text(json.dumps(config))
    elif how == "wrong shape":
        config = json.loads((folder / "transformer" / "config.json").read_text())
        config.update(intermediate_size=config["intermediate_size"] * 2)
        (folder / "transformer" / "config.json").write_text(json.dumps(config))
    elif how == "unknown key":
        f = folder / "text_encoder" / "model.safetensors"
        sd = load_file(f)
        sd["text_model.extra.weight"] = torch.zeros(3)
        save_file(sd, f)
    elif how == "missing tokenizer file":
        (folder / "tokenizer" / "merges.txt").unlink()
    elif how == "unsupported config value":
        config = json.loads((folder / "vqvae" / "config.json").read_text())
        (folder / "vqvae" / "config.json").write_text(json.dumps({**config, "act_fn": "relu"}))
    return folder


BROKEN = {  # how -> what the one-line error must mention
    "missing folder": r"broken: no such file or folder",
    "missing component": r"vqvae/config.json: file not found",
    "truncated weights": r"transformer/diffusion_pytorch_model.safetensors: not a readable safetensors file",
    "corrupt config": r"vqvae/config.json: not valid JSON",
    "512 config on 256 weights": r"transformer/diffusion_pytorch_model.safetensors: keys do not match.*unknown \['down_block.downsample",
    "wrong shape": r"transformer/diffusion_pytorch_model.safetensors: tensors of the wrong shape.*expected",
    "unknown key": r"text_encoder/model.safetensors: keys do not match.*unknown \['text_model.extra.weight'\]",
    "missing tokenizer file": r"tokenizer/merges.txt: file not found",
    "unsupported config value": r"vqvae/config.json: .*act_fn",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_cli_bad_input_is_one_clear_line(tiny_hub, tmp_path, how):
    folder = broken_copy(tiny_hub, tmp_path, how)
    out = tmp_path / "out.safetensors"
    r = run_cli(folder, "-o", out)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    import re
    assert re.search(BROKEN[how], lines[0]), lines[0]
    assert not out.exists()


def test_cli_missing_variant_and_bad_output(tiny_hub, tmp_path):
    folder = shutil.copytree(tiny_hub, tmp_path / "no-fp16", ignore=shutil.ignore_patterns("*.fp16.safetensors"))
    r = run_cli(folder, "-o", tmp_path / "x.safetensors", "--variant", "fp16")
    assert r.returncode == 2 and "model.fp16.safetensors: file not found (the folder has model.safetensors)" in r.stderr
    for bad_out in (tmp_path / "no-such-dir" / "x.safetensors", tmp_path):
        r = run_cli(tiny_hub, "-o", bad_out)
        assert r.returncode == 2 and str(bad_out) in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_loading_a_foreign_safetensors_file_explains(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(2)}, f)
    with pytest.raises(cw.CheckpointError, match="not a converted amused file"):
        cw.load_checkpoint(f)


def test_an_empty_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    for load in (cw.load_checkpoint, lambda f: cw.convert(f, tmp_path / "out.safetensors")):
        with pytest.raises(cw.CheckpointError, match="empty: not a hub-layout checkpoint folder.*nor a file converted"):
            load(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------
# Configs written by other library versions: unknown keys that cannot change the model load with a warning naming
# them; any other unknown key is an error naming it.

NEUTRAL_EXTRAS = {"_use_default_values": ["sample_size"], "_commit_hash": "0123abc", "use_future_kernel": False,
                  "future_option": None}


@pytest.mark.parametrize("name", sorted(cw.COMPONENTS))
def test_configs_with_extra_keys(tiny_hub, tmp_path, name):
    """The configs here are written by the pinned diffusers / transformers (save_pretrained); we add keys to them."""
    folder = shutil.copytree(tiny_hub, tmp_path / "hub")
    config_path = folder / name / "config.json"
    written = json.loads(config_path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the configs as the libraries wrote them: not a word
        plain = cw.load_checkpoint(folder)

    config_path.write_text(json.dumps({**written, **NEUTRAL_EXTRAS}))
    with pytest.warns(UserWarning) as caught:
        ckpt = cw.load_checkpoint(folder)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert str(config_path) in message and all(k in message for k in NEUTRAL_EXTRAS), message
    assert getattr(ckpt, name).cfg == getattr(plain, name).cfg

    for key, value in (("future_option", 3), ("use_future_kernel", True), ("future_mode", "fast")):
        config_path.write_text(json.dumps({**written, key: value}))
        with pytest.raises(cw.CheckpointError, match=rf"config.json: unknown config key '{key}' = {value!r}"):
            cw.load_checkpoint(folder)


def test_text_encoder_config_of_an_older_transformers_loads_silently(tiny_hub, tmp_path):
    """transformers 4.x wrote its generic settings (generation, labels, output flags) into every config.json."""
    folder = shutil.copytree(tiny_hub, tmp_path / "hub")
    config_path = folder / "text_encoder" / "config.json"
    old = {**json.loads(config_path.read_text()), "_name_or_path": "openai/clip-vit-large-patch14",
           "transformers_version": "4.25.1", "torch_dtype": "float32", "max_length": 20, "top_k": 50,
           "return_dict": True, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "num_beams": 1,
           "chunk_size_feed_forward": 0, "tie_word_embeddings": True, "pruned_heads": {}}
    old.pop("dtype", None)
    config_path.write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cw.load_checkpoint(folder).text_encoder.cfg.hidden_size == old["hidden_size"]


# ----------------------------------------------------------------------------------------------------
# Sampling defaults: what a converted file recommends passing to the pipeline


def with_metadata(path, out, **changes):
    """A copy of a converted file with metadata entries changed (None removes one): to write what our writers refuse."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = {**f.metadata(), **changes}
    save_file(load_file(path), out, metadata={k: v for k, v in meta.items() if v is not None})
    return out


def test_sampling_defaults_travel_with_the_file(tiny_hub, tmp_path):
    """None in a hub folder or a plain conversion; train.save_model writes the pipeline's, from_pretrained reads
    them back (a pair as a tuple), and write_sampling_defaults replaces them without touching a tensor."""
    import train
    from amused import Amused
    out = tmp_path / "tiny.safetensors"
    cw.convert(tiny_hub, out)
    assert Amused.from_pretrained(tiny_hub).sampling_defaults == {} == cw.read_sampling_defaults(tiny_hub)
    pipe = Amused.from_pretrained(out)
    assert pipe.sampling_defaults == {} == cw.read_sampling_defaults(out)

    pipe.sampling_defaults = {"steps": 1, "guidance_scale": 0.0, "temperature": [1.0, 0.0], "sampler": "halton"}
    student = tmp_path / "student.safetensors"
    train.save_model(student, pipe)  # a fine-tune keeps its base's recommendation
    expected = {"steps": 1, "guidance_scale": 0.0, "temperature": (1.0, 0.0), "sampler": "halton"}
    assert cw.read_sampling_defaults(student) == expected == Amused.from_pretrained(student).sampling_defaults

    tensors = load_file(student)
    cw.write_sampling_defaults(student, {"steps": 12, "guidance_scale": 4.0})
    assert Amused.from_pretrained(student).sampling_defaults == {"steps": 12, "guidance_scale": 4.0}
    after = load_file(student)
    assert after.keys() == tensors.keys() and all(torch.equal(after[k], t) for k, t in tensors.items())
    cw.write_sampling_defaults(student, {})
    assert cw.read_sampling_defaults(student) == {} and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("defaults, message", [
    ({"step": 12}, "unknown key 'step'; the keys are steps, guidance_scale"),
    ({"height": 64}, "unknown key 'height'"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"steps": 12.5}, "steps must be an integer >= 1, got 12.5"),
    ({"steps": True}, "steps must be an integer >= 1, got true"),
    ({"guidance_scale": -1}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": "4"}, "guidance_scale must be a finite number >= 0"),
    ({"temperature": [1, 2, 3]}, "temperature must be a finite number or a pair"),
    ({"sampler": "greedy"}, "sampler must be one of ('confidence', 'halton'"),
    ({"mask_schedule": "square"}, "mask_schedule must be None or one of"),
    ({"halton_roll": 1}, "halton_roll must be True or False"),
    ([12, 4.0], "sampling_defaults must be an object of pipeline keywords"),
])
def test_bad_sampling_defaults_are_refused_when_written_and_when_loaded(tiny_hub, tmp_path, defaults, message):
    out = tmp_path / "tiny.safetensors"
    cw.convert(tiny_hub, out)
    with pytest.raises(cw.CheckpointError, match="sampling_defaults") as e:
        cw.write_sampling_defaults(out, defaults)
    assert message in str(e.value)
    bad = with_metadata(out, tmp_path / "bad.safetensors", sampling_defaults=json.dumps(defaults))
    for load in (cw.load_checkpoint, cw.read_sampling_defaults):
        with pytest.raises(cw.CheckpointError, match="sampling_defaults") as e:
            load(bad)
        assert message in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(cw.CheckpointError, match="not valid JSON"):
        cw.load_checkpoint(with_metadata(out, tmp_path / "bad2.safetensors", sampling_defaults="{steps: 1"))
    with pytest.raises(cw.CheckpointError, match="not a converted amused file"):
        cw.write_sampling_defaults(with_metadata(out, tmp_path / "foreign.safetensors", format=None), {"steps": 1})
