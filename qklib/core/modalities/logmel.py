"""Whisper's audio front end in torch: 16 kHz samples -> an 80 x 3000 log-mel spectrogram, and which encoder
token (one per 20 ms) falls in which word.

As openai/whisper (``whisper.audio.log_mel_spectrogram``) and transformers' ``WhisperFeatureExtractor`` do:
the audio is zero-padded to 30 s; a 400-sample (25 ms) periodic Hann window every 160 samples (10 ms),
centred frames with reflect padding, the power spectrum's last frame dropped; 80 mel filters on Slaney's scale
with Slaney's area normalisation (librosa's default, 0-8 kHz); ``log10`` of the power clamped at 1e-10, floored
at the spectrogram's maximum minus 8 (80 dB), then ``(x + 4) / 4``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["CHUNK_SAMPLES", "ENCODER_FRAME_S", "HOP", "N_FFT", "N_FRAMES", "N_MELS", "SAMPLE_RATE", "frame_word_ids",
           "hz_to_mel", "log_mel", "mel_filters", "mel_to_hz", "speech_tokens"]

SAMPLE_RATE, N_FFT, HOP, N_MELS = 16_000, 400, 160, 80
CHUNK_SAMPLES = 30 * SAMPLE_RATE
N_FRAMES = CHUNK_SAMPLES // HOP  # 3000 mel frames in, 1500 encoder tokens out
ENCODER_FRAME_S = 2 * HOP / SAMPLE_RATE  # conv2's stride 2: one encoder token per 20 ms

_F_SP, _MIN_LOG_HZ, _MIN_LOG_MEL, _LOG_STEP = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (librosa ``htk=False``): linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    linear = hz / _F_SP
    return torch.where(hz >= _MIN_LOG_HZ, _MIN_LOG_MEL + torch.log(hz.clamp(min=1e-10) / _MIN_LOG_HZ) / _LOG_STEP,
                       linear)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """The inverse of ``hz_to_mel``."""
    return torch.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * torch.exp(_LOG_STEP * (mel - _MIN_LOG_MEL)), _F_SP * mel)


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` float32: triangular filters with edges equally spaced in mel from 0 Hz to
    Nyquist, each scaled by 2 / its width in Hz (Slaney's constant-area norm), as ``librosa.filters.mel``."""
    frequencies = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2,
                                     dtype=torch.float64))
    widths = edges.diff()
    ramps = edges[:, None] - frequencies[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.float()


def log_mel(audio: torch.Tensor | np.ndarray, n_mels: int = N_MELS) -> torch.Tensor:
    """``[n_mels, 3000]`` float32: Whisper's input for ``audio`` (``[N]`` samples at 16 kHz in [-1, 1], at most
    30 s: longer audio is an error, never cut), padded with silence to 30 s. The 80 dB floor is taken over the whole padded spectrogram, as Whisper does."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if audio.ndim != 1 or audio.numel() == 0:
        raise ValueError(f"log_mel takes one channel of samples, shape [N] with N > 0; got {tuple(audio.shape)}")
    if not torch.isfinite(audio).all():
        raise ValueError("the audio has NaN or infinite samples; check the file or the synthesiser's output")
    if audio.numel() > CHUNK_SAMPLES:
        raise ValueError(f"the audio lasts {audio.numel() / SAMPLE_RATE:.1f} s; Whisper's encoder hears at most 30 s: "
                         "synthesise shorter text, or cut the audio into 30-s windows")
    audio = torch.nn.functional.pad(audio, (0, CHUNK_SAMPLES - audio.numel()))
    spectrum = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect",
                          return_complex=True)
    power = spectrum[:, :-1].abs() ** 2
    mel = mel_filters(n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def speech_tokens(seconds: float) -> int:
    """How many encoder tokens cover ``seconds`` of audio (the rest of the 1500 are the padding's): the tokens
    whose centre, ``j * 20 ms``, falls before the end."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds} s")
    return min(N_FRAMES // 2, math.ceil(seconds / ENCODER_FRAME_S))


def frame_word_ids(spans, n_frames: int = N_FRAMES // 2, frame_s: float = ENCODER_FRAME_S) -> torch.Tensor:
    """``[n_frames]`` int64: for each encoder token, the index of the word whose time span ``[start, end)``
    (seconds, one ``(start, end)`` per word) holds its centre, else -1 (silence, padding).

    Encoder token j is centred on mel frame 2j, i.e. on time ``j * 20 ms`` (both convolutions are centred,
    kernel 3; the second has stride 2), and sees mel frames 2j-2 .. 2j+2 (+-20 ms) before attention."""
    ids = torch.full((n_frames,), -1, dtype=torch.int64)
    centres = torch.arange(n_frames, dtype=torch.float64) * frame_s
    for index, (start, end) in enumerate(spans):
        if not 0 <= start <= end:
            raise ValueError(f"word {index}: span ({start}, {end}) s is not an interval from 0 s on")
        ids[(centres >= start) & (centres < end)] = index
    return ids
