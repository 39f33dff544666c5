"""Weight quantizers the quantize pass calls: GPTQ with the calibration Hessians (``gptq``), and the choice of which
Linear layers get 4 bits and which stay int8 under a size budget (``plan``)."""
