// The dtype combinations every backend instantiates its kernels for, listed
// once: X-macros applied to a family's instantiation macro.
#pragma once

// Accumulation types (fp64 stays fp64 for gradcheck; everything else fp32).
#define FUSEDLOSS_FOR_ACC_TYPES(X) X(float) X(double)
// (input, accumulation): kernels that read the inputs themselves.
#define FUSEDLOSS_FOR_INPUT_TYPES(X) X(float, float) X(double, double) X(c10::BFloat16, float) X(c10::Half, float)
// (accumulation, dlogits): gradient kernels; half-precision dlogits feed the
// CUDA GEMMs (the CPU GEMMs read fp32, but both backends offer the same
// kernels to the router, backend.h).
#define FUSEDLOSS_FOR_DLOGITS_TYPES(X) X(float, float) X(double, double) X(float, c10::BFloat16) X(float, c10::Half)
