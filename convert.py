"""Write the model as chat.py, serve.py and eval.py hold it on a CPU into one file that they map back in seconds.

    python convert.py mmgpt-int4.pt --int4      # the release, found where chat.py looks (or the weight flags)
    python chat.py pic.jpg --ckpt mmgpt-int4.pt

Loading the release from its own files reads 23 GB (LLaMA's fp16 shards, OpenFlamingo's fp32 checkpoint), merges
the LoRA into the weights and quantizes them: a minute and more, every time. A converted file holds the result as
the programs hold it (the LoRA merged; the decoder's linear layers in bf16, int8 or 4-bit; the ViT and perceiver in
fp32), with its config and tokenizer; the programs map it and decode from its pages where they lie
(checkpoints.fill_converted). Quantization happens here, once: the file's form is fixed, convert again for another.
"""
import argparse
import os
import sys

import checkpoints
import options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the file to write (a torch .pt file)")
    options.add_weight_args(parser.add_argument_group("the weights to convert, as chat.py takes them (the model is "
                                                      "held as chat.py holds it with the same flags)"))
    args = parser.parse_args(argv)
    if args.dtype not in (None, "bf16") and not (args.int8 or args.int4):
        why = " (fbgemm packs fp16 layers in memory, at each load, in a layout no file holds)"
        raise SystemExit(f"error: --dtype {args.dtype} alone: a converted file holds the decoder's layers in bf16, "
                         f"int8 (--int8) or 4 bits (--int4)" + (why if args.dtype == "fp16" else ""))
    if args.ckpt and checkpoints.is_converted(args.ckpt):
        raise SystemExit(f"error: {args.ckpt} is converted already: convert from the files it came from")
    args.device = "cpu"
    if not (args.int8 or args.int4):
        args.dtype = "bf16"     # the layers in bf16 (quantize.Bf16Linear); beside --int8 / --int4, chat.py's default
    model, tokenizer, _, _ = options.load_model(args, "cpu")
    layers = "int8" if args.int8 else "int4" if args.int4 else "bf16"
    print(f"writing {args.out}", file=sys.stderr, flush=True)
    checkpoints.save_converted(model, tokenizer, layers, args.group_size, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e9:.2f} GB): python chat.py PICTURE --ckpt {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
