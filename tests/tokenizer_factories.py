"""Small native tokenizers built deterministically from the shipped license text, for tests."""
import base64
import io
import json
import re
from collections import Counter
from pathlib import Path

TEXT = (Path(__file__).resolve().parent.parent / "surgery" / "assets" / "python-license.txt").read_text()
# Tekken's pre-tokenizer pattern (tiktoken syntax), as Mistral's tekken.json files carry it.
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# mistral-common's control tokens of a v7 tekken (rank = position): what its instruct tokenizer looks up.
TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                   "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]


def sentencepiece_model(path: Path, vocab: int = 400, normalization: str = "nmt_nfkc") -> Path:
    """A BPE sentencepiece model trained on the license text (sentencepiece's default normalisation unless told)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines()), model_writer=buf, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name=normalization, num_threads=1,
        minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def _bpe_merges(text: str, n_merges: int) -> list[bytes]:
    """Byte-level BPE on whitespace-led words: the most frequent adjacent pair first (ties: smallest bytes)."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    merged: list[bytes] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged.append(best[0] + best[1])
        new: Counter = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return merged


def tekken_file(path: Path, n_merges: int = 120, version: str = "v7") -> Path:
    """A tiny tekken.json in mistral-common's format: 256 byte tokens, learned merges, explicit special tokens."""
    tokens = [bytes([i]) for i in range(256)] + _bpe_merges(TEXT, n_merges)
    vocab = [{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
             for i, t in enumerate(tokens)]
    specials = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(TEKKEN_SPECIALS)]
    data = {
        "config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(tokens), "default_vocab_size": len(tokens) + len(specials),
                   "default_num_special_tokens": len(specials), "version": version},
        "vocab": vocab,
        "special_tokens": specials,
        "version": 1,
        "type": "Tekken",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def tekken_vocab_size(n_merges: int = 120) -> int:
    return 256 + n_merges + len(TEKKEN_SPECIALS)
