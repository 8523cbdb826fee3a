"""English speech without a download: eSpeak NG (PyPI ``espeakng-loader`` ships the library and its voices)
through ctypes, with each word's time span, resampled to Whisper's 16 kHz.

eSpeak runs in synchronous mode (``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...)``): ``espeak_Synth`` calls
our callback with 16-bit PCM at 22,050 Hz and with events; a WORD event gives the word's first character and
length in the text and its first sample, a SENTENCE event starts a sentence. A word ends where the next word (or
the clause's END event) begins, less the trailing silence (a pause after a comma belongs to no word). eSpeak is one
global engine per process: synthesis is serialised by a lock, and the library is loaded afresh for each utterance
so that the same text gives the same samples (if another package holds libespeak-ng loaded, it is not unloaded
and successive utterances can differ by a few samples). A formant synthesiser's voice is far from the
recorded speech Whisper was trained on: say so wherever results on it appear.
"""

from __future__ import annotations

import _ctypes
import ctypes
import re
import threading
from dataclasses import dataclass

import espeakng_loader
import numpy as np
import scipy.signal
import torch

from .logmel import SAMPLE_RATE

__all__ = ["Utterance", "resample", "synthesise"]

_SYNCHRONOUS, _CHARS_UTF8, _RATE_PARAMETER = 2, 1, 1
_WORD, _SENTENCE, _END, _MSG_TERMINATED = 1, 2, 5, 6
SILENCE_WINDOW_S, SILENCE_LEVEL = 0.005, 0.02  # 5 ms windows quieter than 2 % of the utterance's peak are silence


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


_LOCK = threading.Lock()
_unload = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary")


def _open_engine() -> tuple[ctypes.CDLL, int]:
    """A freshly loaded, initialised eSpeak NG and its sample rate. eSpeak keeps state in static variables
    across utterances (even across espeak_Terminate): the same text spoken twice in one process comes out a few
    samples apart. Loading the library anew for each utterance makes synthesis a function of its arguments."""
    library = ctypes.CDLL(espeakng_loader.get_library_path())
    library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    rate = library.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        _unload(library._handle)
        raise RuntimeError(f"eSpeak NG did not start (espeak_Initialize returned {rate}); reinstall espeakng-loader")
    return library, rate


def _speak(text: str, voice: str, words_per_minute: int) -> tuple[np.ndarray, int, list[tuple[int, int, int, int]]]:
    """``(PCM [N] float32 in [-1, 1], sample rate, events (type, character from 1, length, sample))``."""
    chunks, events = [], []

    def collect(samples, count, event_array):
        if count > 0:
            chunks.append(np.ctypeslib.as_array(samples, (count,)).copy())
        index = 0
        while event_array[index].type not in (0, _MSG_TERMINATED):
            event = event_array[index]
            events.append((event.type, event.text_position, event.length, event.sample))
            index += 1
        return 0

    callback = _CALLBACK(collect)  # referenced until synthesis returns
    data = text.encode("utf-8")
    with _LOCK:
        library, rate = _open_engine()
        try:
            library.espeak_SetSynthCallback(callback)
            if library.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"eSpeak NG has no voice {voice!r}; try 'en-us' or 'en' (espeak-ng --voices)")
            library.espeak_SetParameter(_RATE_PARAMETER, int(words_per_minute), 0)
            status = library.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
            library.espeak_Synchronize()
        finally:
            library.espeak_Terminate()
            _unload(library._handle)
    if status != 0:
        raise RuntimeError(f"espeak_Synth failed with status {status} on {text[:60]!r}")
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return pcm.astype(np.float32) / 32768.0, rate, events


def resample(audio: np.ndarray | torch.Tensor, from_rate: int, to_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """``audio`` (``[N]``) from ``from_rate`` to ``to_rate`` Hz by polyphase filtering (scipy's ``resample_poly``,
    a Kaiser-windowed low-pass at the lower Nyquist): 22,050 -> 16,000 Hz is up 320, down 441."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} and {to_rate}")
    gcd = np.gcd(int(from_rate), int(to_rate))
    samples = np.asarray(audio, dtype=np.float64)
    out = scipy.signal.resample_poly(samples, int(to_rate) // gcd, int(from_rate) // gcd)
    return torch.from_numpy(out.astype(np.float32))


@dataclass(frozen=True)
class Utterance:
    """Synthesised speech: ``audio`` ``[N]`` float32 at ``sample_rate`` Hz; per word its text (``words``), time
    span in seconds (``spans``, ``[start, end)``, trailing silence removed) and ``sentence_ids`` (from 0)."""

    text: str
    audio: torch.Tensor
    sample_rate: int
    words: tuple[str, ...]
    spans: tuple[tuple[float, float], ...]
    sentence_ids: tuple[int, ...]

    @property
    def seconds(self) -> float:
        """The utterance's duration."""
        return self.audio.numel() / self.sample_rate


def _voiced_end(pcm: np.ndarray, start: int, end: int, rate: int) -> int:
    """The end of the last 5 ms window in ``pcm[start:end]`` louder than SILENCE_LEVEL of the peak (else ``end``)."""
    window = max(1, int(SILENCE_WINDOW_S * rate))
    level = SILENCE_LEVEL * max(float(np.abs(pcm).max()), 1e-9)
    for stop in range(end, start, -window):
        if np.abs(pcm[max(start, stop - window):stop]).max() > level:
            return stop
    return end


def _word_at(text: str, start: int, length: int) -> str:
    """The word at character ``start``: up to the next space, closing punctuation stripped (eSpeak's own
    ``length`` stops at an apostrophe: "don" for "don't")."""
    match = re.match(r"\S+", text[start:])
    word = match.group().rstrip(".,;:!?\"')]") if match else ""
    return word or text[start:start + length]


def synthesise(text: str, voice: str = "en-us", words_per_minute: int = 175) -> Utterance:
    """``text`` spoken by eSpeak NG at 16 kHz, with each word's time span (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"synthesise needs non-empty text, got {text!r}")
    if not 80 <= words_per_minute <= 450:
        raise ValueError(f"words_per_minute must be in eSpeak's range 80..450, got {words_per_minute}")
    pcm, rate, events = _speak(text, voice, words_per_minute)
    boundaries = sorted({sample for kind, _, _, sample in events if kind in (_WORD, _END)} | {pcm.size})
    words, spans, sentences, sentence = [], [], [], -1
    for kind, position, length, sample in events:
        if kind == _SENTENCE:
            sentence += 1
        if kind != _WORD:
            continue
        following = min(b for b in boundaries if b > sample) if sample < pcm.size else pcm.size
        words.append(_word_at(text, position - 1, length))  # eSpeak counts characters from 1
        spans.append((sample / rate, _voiced_end(pcm, sample, following, rate) / rate))
        sentences.append(max(sentence, 0))
    return Utterance(text, resample(pcm, rate), SAMPLE_RATE, tuple(words), tuple(spans), tuple(sentences))
