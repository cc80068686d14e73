"""Chat with MultiModal-GPT about a picture, for as many rounds as you like, the answers streamed.

    python chat.py cat.jpg                              weights: checkpoints/ or runs/demo (options.find_weights)
    python chat.py cat.jpg --ckpt runs/demo             a train.py output folder
    python chat.py cat.jpg --llama DIR --openflamingo FILE --lora FILE [--vision NAME --vision-weights TAG|FILE]
    python chat.py cat.jpg --greedy --json --prompt "What is this?" --prompt "Why?"      one-shot: answer, exit
    printf 'What is this?\\n/image dog.jpg\\nAnd now?\\n' | python chat.py cat.jpg     each line a round

At the prompt: /image PATH brings a picture into the conversation, /reset starts over, /quit or Ctrl-D leaves;
Ctrl-C stops the answer being written, not the session. Without a picture it is a language-only chat.

How the conversation is kept. It is the paper's template string (conversation.layout), answers as the text the
user saw, each closed with </s>, also when cut at the token limit or by Ctrl-C; every round tokenises the whole
string (one BOS) and asks the model for the next answer. So an answer's ids in the context are the tokenisation of
its text, as MultiModal-GPT's demo and training have them, not necessarily the ids that were sampled: the context
is exactly what a full forward over the rendered conversation sees, reproducible from the transcript alone.
The engine (engine.py, one slot) keeps the cache from round to round: a round feeds only the ids past the longest
prefix the slot holds (usually the new instruction; sometimes also the tail of the last answer, when its text
tokenises differently). A picture brought in later opens a new `### Image:` block before the next question; the
engine recomputes the tokens that the media-masking rule hands to it, and each picture's features are computed
once.
"""
import argparse
import json
import os
import sys

import options
from conversation import Conversation, DataError, Turn, layout, load_image, prompt
from engine import Engine, Request, Sampling

COMMANDS = """commands:
  /image PATH   bring a picture into the conversation (its block goes before your next question)
  /reset        start over (with the picture given on the command line, if any)
  /quit         leave (or Ctrl-D); Ctrl-C stops the answer being written
  /help         this list"""


def notice(message: str):
    """Everything that is not an answer goes to stderr, so stdout holds only answers (or --json lines)."""
    print(message, file=sys.stderr, flush=True)


class Chat:
    """One conversation (its parts: a picture, then the turns asked after it) answered by an engine with one slot.
    Only the first part may lack a picture (a chat that starts language-only)."""

    def __init__(self, engine: Engine, image_transform, max_new_tokens: int = 256, sampling: Sampling = Sampling()):
        self.engine, self.tokenizer, self.image_transform = engine, engine.tokenizer, image_transform
        # An answer may take at most half the context (LLaMA-7B: 2048, so 256 stands), or every round of a model
        # with a short context would push out the one before it.
        self.max_new_tokens, self.sampling = min(max_new_tokens, engine.max_len // 2), sampling
        self.reset()

    def reset(self):
        """Forget the conversation and its pictures."""
        self.parts = [Conversation(None, [])]
        self.pixels = []            # one (3, H, W) tensor per part that has a picture, in order

    def add_picture(self, path: str):
        """Bring in a picture; raises DataError when it cannot be read (the conversation is unchanged)."""
        pixels = self.image_transform(load_image(path))
        part = self.parts[-1]
        if part.turns:      # a new part: its `### Image:` block goes before the next question
            self.parts.append(Conversation(path, []))
            self.pixels.append(pixels)
        elif part.image is None:
            part.image = path
            self.pixels.append(pixels)
        else:               # nothing was asked about the previous picture yet: this one takes its place
            part.image, self.pixels[-1] = path, pixels

    def text(self) -> str:
        """The whole conversation on the paper's template, ending with the last question's "### Response:\\n"."""
        return layout(self.parts, open_last=True)[0]

    def ask(self, question: str, on_text=lambda text: None) -> list[int] | None:
        """Answer `question`, passing each new piece of the answer's text to on_text as it comes; returns the
        answer's ids (without its </s>), or None when the question does not fit in the model's context at all."""
        if any(s in question for s in self.tokenizer.special):
            notice(f"error: the question contains one of {', '.join(self.tokenizer.special)}, which the model "
                   f"reads as control tokens; rephrase it (pictures come in with /image PATH)")
            return None
        turn = Turn(question, "")
        alone = len(self.tokenizer.encode(prompt(Conversation(self.parts[-1].image, [turn]))))
        if alone >= self.engine.max_len:    # not even with every earlier round dropped: keep them, say so
            notice(f"error: the question takes {alone} tokens with the template; the model's context holds "
                   f"{self.engine.max_len}: not answered")
            return None
        self.parts[-1].turns.append(turn)
        ids = self._fit()
        # Special tokens are never sampled, but their strings could be spelled out of ordinary pieces; in the
        # context they would become control tokens, so the answer ends before one.
        request = self.engine.submit(Request(ids, list(self.pixels), sampling=self.sampling,
                                             max_tokens=min(self.max_new_tokens, self.engine.max_len - len(ids)),
                                             stop=tuple(self.tokenizer.special)))
        try:
            while request.finish_reason is None:
                for out in self.engine.step():
                    on_text(out.text)
        except KeyboardInterrupt:
            self.engine.cancel(request)
            self.engine.step()          # ends it; the slot keeps what it holds, and the next round reuses it
            notice("[stopped]")
        turn.answer = request.text
        return request.tokens

    def _fit(self) -> list[int]:
        """The conversation's ids, after dropping the oldest turns while it and a whole answer would pass the
        model's context (or its pictures the engine's limit). A picture's block stays as long as a turn asked
        after it does."""
        dropped = 0
        while True:
            ids = self.tokenizer.encode(self.text())
            fits = len(ids) + self.max_new_tokens <= self.engine.max_len and \
                len(self.pixels) <= self.engine.max_pictures
            if fits or sum(len(p.turns) for p in self.parts) == 1:
                break
            first = self.parts[0]
            first.turns.pop(0)
            dropped += 1
            if not first.turns:
                self.parts.pop(0)
                if first.image is not None:
                    self.pixels.pop(0)
        if dropped:
            notice(f"[context full: dropped the {'oldest round' if dropped == 1 else f'{dropped} oldest rounds'}]")
        return ids


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
    except DataError as e:
        notice(f"error: {e}; the conversation goes on without it")
        return False


def answer(chat: Chat, question: str, as_json: bool):
    ids = chat.ask(question, (lambda text: None) if as_json else (lambda text: print(text, end="", flush=True)))
    if ids is None:
        return
    if as_json:
        print(json.dumps({"prompt": question, "text": chat.parts[-1].turns[-1].answer, "ids": ids}), flush=True)
    else:
        print(flush=True)


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
    options.add_weight_args(ap.add_argument_group(
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
    d.add_argument("--seed", type=int, help="seed of the sampling: each answer is drawn with it (default: fresh)")
    d.add_argument("--device", help="default: cuda when there is one, else cpu")
    d.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="decoding compiled, with CUDA graphs (default: on with a GPU; --no-fast: eager)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        ap.error("--top-p must be in (0, 1] and --top-k >= 0")

    try:
        device = options.device_of(args)
        model, tokenizer, image_transform, memory = options.load_model(args, device)
        slots, max_len = options.cache_slots(model, memory, 1)
        fast = options.fast_of(args, device)
        if fast:
            notice("warming up ...: the first answer compiles the decoder (and each new prompt length bucket compiles "
                   "once more); --no-fast skips it")
        engine = Engine(model, tokenizer, slots=slots, max_len=max_len, fast=fast)
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                            seed=args.seed)
        session(Chat(engine, image_transform, args.max_new_tokens, sampling), args, rounds(args))
    except KeyboardInterrupt:   # while loading
        raise SystemExit(130)


if __name__ == "__main__":
    main()
