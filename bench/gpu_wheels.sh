#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the GPU machine, into .whl/ (git-ignored; the device tool carries it).
#
# That machine (Python 3.12, x86-64, no network) already has torch 2.11, transformers, accelerate, peft,
# huggingface-hub, safetensors, tokenizers, numpy, pillow, httpx, prometheus-client, pyyaml, requests (the
# device README's package list). What bench/gpu.py imports beyond those, and nothing else: it never imports
# celery, boto3, typer or fastapi (the C path builds process.Context itself, without worker.runtime), and
# the optional imports of diffusers, accelerate and redis (boto3, scipy, opentelemetry …) stay optional.
# Versions are the ones the CPU run was verified with. Run here, once:  bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=(
  diffusers==0.42.1                  # HiDreamImagePipeline, the transformer, the VAE
  torchao==0.18.0                    # the fp8 section (its C extensions are built for torch >= 2.11)
  pydantic==2.13.4                   # jobs.models, jobs.settings
  pydantic-core==2.46.4
  annotated-types==0.7.0
  typing-inspection==0.4.2
  typing-extensions==4.16.0          # pydantic needs >= 4.14.1; the machine's may be older
  pydantic-settings==2.14.1          # jobs.settings
  python-dotenv==1.2.2
  redis==8.1.0                       # jobs.submit names redis' and kombu's connection errors
  kombu==5.7.0
  amqp==5.4.2
  vine==5.1.0
)

mkdir -p .whl
for wheel in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$wheel"
done
ls -l .whl
du -sh .whl
