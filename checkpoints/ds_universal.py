"""`python -m checkpoints.ds_universal --input_folder ... --output_folder ...`: DeepSpeed's ds_to_universal with
every `torch.load` it makes restricted to torch's weights-only unpickler (checkpoints/safe_load.py)."""

from __future__ import annotations

from checkpoints.safe_load import deepspeed_loads_weights_only


def main() -> None:
    from deepspeed.checkpoint import ds_to_universal

    with deepspeed_loads_weights_only():
        ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    main()
