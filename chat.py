"""Chat with MultiModal-GPT about a picture, for as many rounds as you like, the answers streamed.

    python chat.py cat.jpg                              weights from checkpoints/ or runs/demo (see find_weights)
    python chat.py cat.jpg --ckpt runs/demo             a train.py output folder
    python chat.py cat.jpg --llama DIR --openflamingo FILE --lora FILE [--vision NAME --vision-weights TAG|FILE]
    python chat.py cat.jpg --greedy --json --prompt "What is this?" --prompt "Why?"      one-shot: answer, exit
    printf 'What is this?\\n/image dog.jpg\\nAnd now?\\n' | python chat.py cat.jpg     each line a round

At the prompt: /image PATH brings a picture into the conversation, /reset starts over, /quit or Ctrl-D leaves;
Ctrl-C stops the answer being written, not the session. Without a picture it is a language-only chat.

How the conversation is kept. It is the paper's template string (data.prompt), answers as the text the user saw,
each closed with </s>, also when cut at the token limit or by Ctrl-C; every round tokenises the whole string
(one BOS) and asks the model for the next answer. So an answer's ids in the context are the tokenisation of its
text, as MultiModal-GPT's demo and training have them, not necessarily the ids that were sampled: the context is
exactly what a full forward over the rendered conversation sees, reproducible from the transcript alone.
The KV cache persists across rounds: a round feeds only the ids past the longest prefix the cache already holds
(usually the new instruction; sometimes also the tail of the last answer, when its text tokenises differently).
A picture brought in later opens a new `### Image:` block before the next question; MMGPT.extend recomputes the
tokens that the media-masking rule hands to it, and each picture's features are computed once.
"""
import argparse
import json
import os
import sys

import torch

import data
import checkpoints
import lora
import mmgpt
import quantize

DEMO_RUN = "runs/demo"  # where train.py's demo run goes
COMMANDS = """commands:
  /image PATH   bring a picture into the conversation (its block goes before your next question)
  /reset        start over (with the picture given on the command line, if any)
  /quit         leave (or Ctrl-D); Ctrl-C stops the answer being written
  /help         this list"""


def notice(message: str):
    """Everything that is not an answer goes to stderr, so stdout holds only answers (or --json lines)."""
    print(message, file=sys.stderr, flush=True)


class Chat:
    """One conversation: its parts (a picture, then the turns asked after it), the KV cache, and decoding.

    Only the first part may lack a picture (a chat that starts language-only). sampling: mmgpt.sample's options.
    """

    def __init__(self, model: mmgpt.MMGPT, tokenizer: mmgpt.Tokenizer, image_transform, max_new_tokens: int = 256,
                 **sampling):
        self.model, self.tokenizer, self.image_transform = model, tokenizer, image_transform
        # An answer may take at most half the context (LLaMA-7B: 2048, so 256 stands), or every round of a model
        # with a short context would push out the one before it.
        self.max_new_tokens, self.sampling = min(max_new_tokens, model.cfg.max_seq_len // 2), sampling
        self.cache = model.new_cache()
        self.reset()

    def reset(self):
        """Forget the conversation and its pictures."""
        self.parts = [data.Conversation(None, [])]
        self.pixels = []            # one (3, H, W) tensor per part that has a picture, in order
        self.cache.reset()

    def add_picture(self, path: str):
        """Bring in a picture; raises data.DataError when it cannot be read (the conversation is unchanged)."""
        pixels = self.image_transform(data.load_image(path))
        part = self.parts[-1]
        if part.turns:      # a new part: its `### Image:` block goes before the next question
            self.parts.append(data.Conversation(path, []))
            self.pixels.append(pixels)
        elif part.image is None:
            part.image = path
            self.pixels.append(pixels)
        else:               # nothing was asked about the previous picture yet: this one takes its place
            part.image, self.pixels[-1] = path, pixels

    def text(self) -> str:
        """The whole conversation on the paper's template, ending with the last question's "### Response:\\n"."""
        out = ""
        for k, part in enumerate(self.parts):
            last = k == len(self.parts) - 1
            s = data.prompt(part, open_last=last)
            if not last and part.turns[-1].answer == "":
                s += data.EOS   # data.prompt takes an empty last answer for an open one; this one is finished
            out += s if k == 0 else s[len(data.HEADER):]   # later parts continue the same string
        return out

    def ask(self, question: str, on_text=lambda text: None) -> list[int] | None:
        """Answer `question`, passing the answer's text so far to on_text after each token; returns the answer's
        ids (without its </s>), or None when the question does not fit in the model's context at all."""
        if any(s in question for s in self.tokenizer.special):
            notice(f"error: the question contains one of {', '.join(self.tokenizer.special)}, which the model "
                   f"reads as control tokens; rephrase it (pictures come in with /image PATH)")
            return None
        turn = data.Turn(question, "")
        alone = len(self.tokenizer.encode(data.prompt(data.Conversation(self.parts[-1].image, [turn]))))
        if alone >= self.cache.max_len:     # not even with every earlier round dropped: keep them, say so
            notice(f"error: the question takes {alone} tokens with the template; the model's context holds "
                   f"{self.cache.max_len}: not answered")
            return None
        self.parts[-1].turns.append(turn)
        ids = self._fit()
        budget = min(self.max_new_tokens, self.cache.max_len - len(ids))
        # Keep the longest prefix the cache holds (at least one id is fed: the logits come from the last one).
        keep = 0
        while keep < min(len(self.cache.ids), len(ids) - 1) and self.cache.ids[keep] == ids[keep]:
            keep += 1
        self.cache.truncate(keep)
        new = ids[len(self.cache.ids):]
        n = new.count(self.tokenizer.image_id)
        images = torch.stack(self.pixels[len(self.pixels) - n:])[None] if n else None
        answer = []
        try:
            for token in mmgpt.generate(self.model, self.cache, new, images, max_new_tokens=budget,
                                        eos_id=self.tokenizer.eos_id, banned=self.tokenizer.never_generate,
                                        **self.sampling):
                text = self.tokenizer.decode(answer + [token])
                # Special tokens are never sampled, but their strings could be spelled out of ordinary pieces; in
                # the context they would become control tokens, so the answer ends before one.
                if any(s in text for s in self.tokenizer.special):
                    break
                answer.append(token)
                on_text(text)
        except KeyboardInterrupt:
            notice("[stopped]")         # extend() leaves the cache valid when interrupted
        turn.answer = self.tokenizer.decode(answer)
        return answer

    def _fit(self) -> list[int]:
        """The conversation's ids, after dropping the oldest turns while it and a whole answer would pass the
        model's context. A picture's block stays as long as a turn asked after it does."""
        dropped = 0
        while True:
            ids = self.tokenizer.encode(self.text())
            if len(ids) + self.max_new_tokens <= self.cache.max_len or sum(len(p.turns) for p in self.parts) == 1:
                break
            first = self.parts[0]
            first.turns.pop(0)
            dropped += 1
            if not first.turns:
                self.parts.pop(0)
                if first.image is not None:
                    self.pixels.pop(0)
                    self.cache.reset()  # the cached <image> tokens now stand for other pictures
        if dropped:
            notice(f"[context full: dropped the {'oldest round' if dropped == 1 else f'{dropped} oldest rounds'}]")
        return ids


# ----------------------------------------------------------------------------------------------------------------
# Weights

def add_weight_args(group):
    """The flags find_weights reads (eval.py takes the same)."""
    group.add_argument("--ckpt", help="a train.py output folder (or its lora.pt)")
    group.add_argument("--llama", help="HF LLaMA directory (config.json, weights, tokenizer.model)")
    group.add_argument("--openflamingo", help="OpenFlamingo checkpoint.pt")
    group.add_argument("--lora", help="the MultiModal-GPT LoRA release .pt, or a train.py lora.pt")
    group.add_argument("--vision", default="ViT-L-14", help="open_clip model name or model-config JSON")
    group.add_argument("--vision-weights", default="openai", help="open_clip pretrained tag or a CLIP weights file")
    group.add_argument("--int8", action="store_true",
                       help="decoder weights in int8 (LoRA merged first; quantize.py): half the memory of bf16")


def find_weights(args) -> dict:
    """load() or load_run() arguments: from the flags, else the release layout, else runs/demo; else exit with
    what to pass and where the weights come from."""
    if args.ckpt and (args.llama or args.openflamingo or args.lora):
        raise SystemExit("error: give either --ckpt or --llama/--openflamingo/--lora, not both")
    if args.ckpt:
        return {"run": args.ckpt}
    if args.llama:
        return {"llama": args.llama, "openflamingo": args.openflamingo, "lora": args.lora}
    if args.openflamingo or args.lora:
        raise SystemExit("error: --openflamingo and --lora need --llama DIR (the LLaMA they were trained on)")
    if all(os.path.exists(p) for p in checkpoints.RELEASE.values()):
        notice(f"using {', '.join(checkpoints.RELEASE.values())}")
        return dict(checkpoints.RELEASE)
    if os.path.isfile(os.path.join(DEMO_RUN, "lora.pt")):
        notice(f"using {DEMO_RUN}")
        return {"run": DEMO_RUN}
    found = "\n".join(f"  {p:42s} {'found' if os.path.exists(p) else 'MISSING'}: {checkpoints.RELEASE_SOURCES[k]}"
                      for k, p in checkpoints.RELEASE.items())
    raise SystemExit(
        f"error: no weights given and none found in {os.getcwd()}. Pass one of\n"
        f"  --ckpt RUN_DIR                               a train.py output folder (its lora.pt names its base model)\n"
        f"  --llama DIR --openflamingo FILE --lora FILE  the MultiModal-GPT release files\n"
        f"or put the release where the MultiModal-GPT README says, relative to the current directory:\n{found}\n"
        f"(the CLIP ViT-L/14 'openai' weights are fetched by open_clip on first use, or give --vision-weights FILE)\n"
        f"or train a model with train.py into {DEMO_RUN}/, which is looked for next.")


def load_model(args, device: str):
    """(model, tokenizer, image_transform); a file that is missing or cannot be used ends the program, in one line."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    weights = find_weights(args)
    # int8: built and quantized in host memory, then moved, so the card never holds the bf16 weights
    where = "cpu" if args.int8 else device
    try:
        if "run" in weights:
            model, tokenizer, transform = checkpoints.load_run(weights["run"], device=where, dtype=dtype)
        else:
            model, tokenizer, transform = checkpoints.load(**weights, vision=args.vision,
                                                           vision_weights=args.vision_weights, device=where,
                                                           dtype=dtype)
    except (OSError, ValueError) as e:   # FileNotFoundError, CheckpointError (a ValueError), ...
        raise SystemExit(f"error: {e}") from None
    if args.int8:
        model = quantize.quantize_int8(model).to(device)
    return model, tokenizer, transform


def make_fast(model: mmgpt.MMGPT, backend: str = "inductor"):
    """chat.py's fast path (default on a GPU): LoRA folded into the weights (chat never trains, and a merged
    layer is one matmul instead of three), the decode step compiled with CUDA graphs, the prefill per length
    bucket, the ViT compiled (MMGPT.compile_decoding). Greedy answers equal the eager path's."""
    lora.merge(model)
    model.compile_decoding(backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# The session

def interactive_lines():
    import readline  # noqa: F401  (importing it gives input() line editing and history)
    while True:
        try:
            yield input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:   # at the prompt, Ctrl-C drops the line being typed
            print()


def rounds(args):
    """The rounds' lines: the --prompt texts, else stdin's lines when it is not a terminal, else the user's."""
    if args.prompt:
        return valid_text(args.prompt)
    sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 (pasted, typed) must not end the chat
    if not sys.stdin.isatty():
        return valid_text(line.rstrip("\r\n") for line in sys.stdin)
    notice(f"chatting {'about ' + args.image if args.image else 'without a picture'}; /help lists the commands")
    return valid_text(interactive_lines())


def valid_text(lines):
    """Lines as valid Unicode: what is not (bytes that are not UTF-8, lone surrogates, as the terminal or the
    command line hand them over) becomes U+FFFD, and the user is told."""
    for line in lines:
        fixed = line.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        if fixed != line or "\ufffd" in line:
            notice("note: that line held bytes that are not UTF-8 text; they are read as \ufffd")
        yield fixed


def use_picture(chat: Chat, path: str) -> bool:
    try:
        chat.add_picture(path)
        return True
    except data.DataError as e:
        notice(f"error: {e}; the conversation goes on without it")
        return False


def answer(chat: Chat, question: str, as_json: bool):
    shown = ""

    def stream(text):
        nonlocal shown
        # Print what is new, holding back a character whose bytes have not all come yet.
        if not as_json and text.startswith(shown) and not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text

    ids = chat.ask(question, stream)
    if ids is None:
        return
    text = chat.tokenizer.decode(ids)
    if as_json:
        print(json.dumps({"prompt": question, "text": text, "ids": ids}), flush=True)
    else:
        print(text[len(shown):] if text.startswith(shown) else "", flush=True)


def session(chat: Chat, args, lines):
    picture = args.image if args.image and use_picture(chat, args.image) else None
    for line in lines:
        line = line.strip()
        command, _, arg = line.partition(" ")
        try:
            if not line:
                continue
            elif command == "/quit":
                return
            elif command == "/reset":
                chat.reset()
                if picture:
                    use_picture(chat, picture)
                notice("[conversation reset]")
            elif command == "/image":
                path = os.path.expanduser(arg.strip().strip("'\""))
                if not path:
                    notice("usage: /image PATH")
                elif use_picture(chat, path):
                    notice(f"[picture {path}: ask about it]")
            elif command in ("/help", "/?"):
                notice(COMMANDS)
            else:
                answer(chat, line, args.json)
        except KeyboardInterrupt:   # outside an answer (loading a picture, say): back to the prompt
            notice("[interrupted]")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Chat with MultiModal-GPT about a picture.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMANDS)
    ap.add_argument("image", nargs="?", help="the picture to talk about (none: a language-only chat)")
    add_weight_args(ap.add_argument_group(
        "weights (none: checkpoints/ as the MultiModal-GPT README lays it out, then runs/demo)"))
    o = ap.add_argument_group("one-shot use")
    o.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a round's question (repeat for more rounds; commands work too); answer and exit")
    o.add_argument("--json", action="store_true",
                   help='print one JSON line per answer: {"prompt", "text", "ids"} (ids without the closing </s>)')
    d = ap.add_argument_group("decoding (defaults: the MultiModal-GPT demo's sampling, without its beam search)")
    d.add_argument("--max-new-tokens", type=int, default=256)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--top-k", type=int, default=20, help="0: off")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--greedy", action="store_true", help="always the most likely token")
    d.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh one)")
    d.add_argument("--device", help="default: cuda when there is one, else cpu")
    d.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="the weights' dtype (default: bf16 on GPU, fp32 on CPU)")
    d.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA merged, decoding compiled with CUDA graphs (default: on with a GPU; --no-fast: eager)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")

    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, image_transform = load_model(args, device)
        if args.fast if args.fast is not None else device.startswith("cuda"):
            make_fast(model)
            notice("warming up ...: the first answer compiles the decoder (and each new prompt length bucket or "
                   "number of pictures compiles once more); --no-fast skips it")
        generator = None if args.seed is None else torch.Generator(device).manual_seed(args.seed)
        chat = Chat(model, tokenizer, image_transform, args.max_new_tokens, greedy=args.greedy,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
        session(chat, args, rounds(args))
    except KeyboardInterrupt:   # while loading
        raise SystemExit(130)


if __name__ == "__main__":
    main()
