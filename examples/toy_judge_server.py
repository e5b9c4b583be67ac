"""A loopback OpenAI-compatible judge for the synthetic toy set (data/toy.py), so stage 3 runs offline.

It answers POST .../chat/completions the way a multimodal judge would, grading the reasoning with the
paper's rubric (rewards.DEFAULT_RUBRIC) against the toy generator's ground truth. The request carries
everything needed: the [Question] names the attribute asked about (each toy question text belongs to
one attribute family), the [Standard answer] gives its true class, and the image gives the tile size
(nuclear diameters in the explanations are in pixels of that tile).

integrity_score = 1.0 - 0.4 per missing step:
  (a) image features: the reasoning describes the asked attribute (words of one class's evidence in
      data.toy, e.g. "crowd", "wide stroma", "open pale chromatin");
  (b) elimination: at least two options other than the one it concludes are named;
  (c) medical knowledge: a histology term (stroma, hematoxylin, epithelium, chromatin, ...).
knowledge_score = 1.0 - 0.4 per infraction:
  - the features described are those of another class than the true one;
  - a number is false (a nuclei count outside the true class's range, a diameter off by more than 1 px);
  - the true answer is among the options it rules out;
  - the reasoning concludes one class and the predicted answer names another.
Both are floored at 0. The reply is the JSON the rubric asks for, in the chat-completions shape.

    python examples/toy_judge_server.py --port 0       # prints its base URL, serves until Ctrl-C

From Python: `with ToyJudgeServer() as server: JudgeReward(server.base_url, "toy-judge")`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The judge is the generator's other half: it grades against the same tables the tiles and their
# explanations were drawn from.
from data.toy import _BASE_SIZE, _EVIDENCE, _NUCLEI_COUNT, _NUCLEUS_RADIUS, _QUESTIONS, TOY_FAMILIES  # noqa: E402

_SECTION = re.compile(r"<<<BEGIN (?P<name>[A-Z ]+)>>>\n(?P<body>.*?)\n<<<END (?P=name)>>>", re.DOTALL)
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
_KNOWLEDGE_TERMS = {"stroma", "hematoxylin", "hematoxylin-stained", "eosin", "eosinophilic", "lymphocytes",
                    "epithelium", "gland", "chromatin", "atypia", "collagen", "lumens", "cytoplasm"}
_STOPWORDS = {"the", "a", "an", "and", "of", "in", "with", "as", "to", "by", "are", "is", "lie", "but", "not",
              "about", "around", "than", "pixels", "across", "nuclei", "tile", "them", "each", "other", "their",
              "between", "along", "it", "its", "no", "or", "one", "well", "way", "cells", "size", "close", "giving",
              "inside", "present", "form", "left"}


def _evidence_words() -> dict[str, dict[str, set[str]]]:
    """family -> class -> words that only this class's evidence sentence uses (within its family)."""
    words = {}
    for family, sentences in _EVIDENCE.items():
        per_class = {cls: set(_WORD.findall(text.lower())) - _STOPWORDS for cls, text in sentences.items()}
        words[family] = {cls: own - set().union(*(w for other, w in per_class.items() if other != cls))
                         for cls, own in per_class.items()}
    return words


EVIDENCE_WORDS = _evidence_words()
FAMILY_OF_QUESTION = {question.lower(): family for family, question in _QUESTIONS.items()}


def find_classes(text: str, family: str) -> list[str]:
    """Class names of `family` in the order they occur in `text` (longest names first: "very dense" is not "dense")."""
    found, text = [], text.lower()
    for name in sorted((c.lower() for c in TOY_FAMILIES[family]), key=len, reverse=True):
        for match in re.finditer(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
            found.append((match.start(), name))
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", lambda m: "#" * len(m.group()), text)
    return [name for _, name in sorted(found)]


def grade(question: str, thinking: str, predicted_answer: str, standard_answer: str, image_size: int | None = None
          ) -> tuple[float, float]:
    """(integrity, knowledge) of one reasoning, by the rules in the module docstring.

    Raises ValueError when the question is not a toy question or the standard answer not one of its classes.
    """
    family = next((f for q, f in FAMILY_OF_QUESTION.items() if q in question.lower()), None)
    if family is None:
        raise ValueError(f"not a toy question: {question[:80]!r}")
    truth = find_classes(re.sub(r"^\(?[A-D][).:]\s*", "", standard_answer.strip()), family)
    if not truth:
        raise ValueError(f"standard answer {standard_answer!r} names no {family} class")
    truth = truth[0]
    think = thinking.lower()
    words = set(_WORD.findall(think))

    overlap = {cls: len(own & words) for cls, own in EVIDENCE_WORDS[family].items()}
    described = max(overlap, key=overlap.get) if max(overlap.values()) > 0 else None
    named = find_classes(think, family)
    concluded = named[-1] if named else None
    ruled_out = set(named) - {concluded}
    predicted = find_classes(re.sub(r"^\(?[A-D][).:]\s*", "", predicted_answer.strip()), family)

    missing = [described is None, len(ruled_out) < 2, not (words & _KNOWLEDGE_TERMS)]
    infractions = [
        described is not None and described != truth,
        _false_number(think, family, truth, image_size),
        truth in ruled_out,
        concluded is not None and bool(predicted) and predicted[0] != concluded,
    ]
    return max(0.0, round(1.0 - 0.4 * sum(missing), 2)), max(0.0, round(1.0 - 0.4 * sum(infractions), 2))


def _false_number(think: str, family: str, truth: str, image_size: int | None) -> bool:
    if family == "density":
        low, high = _NUCLEI_COUNT[truth]
        counts = [int(n) for n in re.findall(r"(?:about|around|only about)\s+(\d+)", think)]
        return any(not low <= n <= high for n in counts)
    if family == "nuclear_size" and image_size:
        diameter = round(2 * _NUCLEUS_RADIUS[truth] * image_size / _BASE_SIZE)
        sizes = [int(n) for n in re.findall(r"(\d+)\s+pixels", think)]
        return any(abs(n - diameter) > 1 for n in sizes)
    return False


def grade_request(body: dict) -> dict:
    """The rubric scores for one chat-completions request body (raises ValueError on a malformed one)."""
    try:
        content = body["messages"][-1]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("body needs messages[-1].content") from None
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    text = "\n".join(p.get("text", "") for p in parts if p.get("type") == "text")
    sections = {m.group("name"): m.group("body") for m in _SECTION.finditer(text)}
    needed = ("QUESTION", "THINKING CHAIN", "PREDICTED ANSWER", "STANDARD ANSWER")
    if any(name not in sections for name in needed):
        raise ValueError(f"the prompt lacks the delimited sections {[n for n in needed if n not in sections]}")
    image_size = None
    for part in parts:
        url = (part.get("image_url") or {}).get("url", "") if part.get("type") == "image_url" else ""
        if url.startswith("data:"):
            image_size = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size[0]
    integrity, knowledge = grade(sections["QUESTION"], sections["THINKING CHAIN"], sections["PREDICTED ANSWER"],
                                 sections["STANDARD ANSWER"], image_size)
    return {"integrity_score": integrity, "knowledge_score": knowledge}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is used

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.split("?")[0].endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"unknown path {self.path}", "type": "not_found"}})
        try:
            body = json.loads(raw)
            scores = grade_request(body)
        except (ValueError, TypeError) as error:
            return self._send(400, {"error": {"message": str(error), "type": "invalid_request_error"}})
        reply = json.dumps(scores)
        prompt_tokens = sum(len(p.get("text", "").split()) for p in body["messages"][-1]["content"]
                            if isinstance(p, dict))
        self.server.requests += 1
        self._send(200, {
            "id": f"toyjudge-{self.server.requests}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "toy-judge"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(reply.split()),
                      "total_tokens": prompt_tokens + len(reply.split())},
        })

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # one line per request would drown the demo's output
        pass


class ToyJudgeServer:
    """The toy judge on a free 127.0.0.1 port, served from a background thread; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = 0
        self._thread = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> int:
        return self.httpd.requests

    def start(self) -> "ToyJudgeServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="toy-judge",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "ToyJudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    server = ToyJudgeServer(args.host, args.port)
    print(server.base_url, flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
