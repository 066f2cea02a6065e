// Catch2 2.x needs its main from a macro in one translation unit; 3.x links Catch2WithMain.
#if !defined(LMD_CATCH3)
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
