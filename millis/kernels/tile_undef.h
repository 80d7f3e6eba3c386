/* amx.c: the end of one form of the tile operations (the C form, AVX-512 BF16 vectors): their names freed for
   the next form's definitions. No include guard: included after each form. */
#undef AMX_FN
#undef AMXQ_FN
#undef AMXR_FN
#undef ATT_FN
#undef TDPI
#undef TDPU
#undef TCONFIG
#undef TRELEASE
#undef TZERO
#undef TLOAD
#undef TSTORE
#undef TDP
