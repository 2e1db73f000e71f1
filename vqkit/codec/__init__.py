"""The speech codec: encode/decode, side codes, chunked streaming and the .vqc file."""
