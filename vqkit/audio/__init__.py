"""Audio: file I/O and resampling, the one STFT and mel scale, front ends, normalisers and
synthesis."""
