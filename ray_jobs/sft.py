"""Frozen-base SFT of the memory modules on Ray Train (the installed command `explicitlm-sft`).

    python ray_jobs/sft.py                                  # embedded default: tiny Qwen3, sample facts
    python ray_jobs/sft.py --config-name sft_omcq key=value ...
    ray job submit --working-dir . -- python ray_jobs/sft.py training.output_dir=/shared/run ...

Re-running with the same `training.output_dir` resumes from its latest checkpoint; --help lists the keys.
Before any worker starts, the job prints its memory estimate per GPU worker and stops if it cannot fit.
"""

from explicitlm.cli.sft import main

if __name__ == "__main__":
    raise SystemExit(main())
