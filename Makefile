# C distribution of sdxl: `make dist` builds the library and collects
#   dist/include/sdxl.h
#   dist/lib/libsdxl.a   (static: link with -lpthread -ldl -lm -lrt -lutil -lgcc_s on Linux)
#   dist/lib/libsdxl.so  (shared; libsdxl.dylib on macOS, sdxl.dll + sdxl.dll.lib on Windows)
# `make example` builds examples/c/generate.c against dist/; `make header` regenerates
# include/sdxl.h; `make c-tests` runs the C test programs (also part of `cargo test`).
# FEATURES="cuda" (or metal, …) builds with GPU support.

CARGO    ?= cargo
CC       ?= cc
PROFILE  ?= release
FEATURES ?=
TARGET_DIR ?= target
SYSLIBS  := -lpthread -ldl -lm -lrt -lutil -lgcc_s

PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,$(if $(filter debug dev,$(PROFILE)),,--profile $(PROFILE)))
PROFILE_DIR  := $(if $(filter dev debug,$(PROFILE)),debug,$(PROFILE))
FEATURE_FLAG := $(if $(FEATURES),--features "$(FEATURES)",)

.PHONY: dist lib header example c-tests clean-dist

lib:
	$(CARGO) build -p sdxl-ffi --lib $(PROFILE_FLAG) $(FEATURE_FLAG)

dist: lib
	mkdir -p dist/include dist/lib
	cp include/sdxl.h dist/include/
	cp $(TARGET_DIR)/$(PROFILE_DIR)/libsdxl.a dist/lib/
	for f in libsdxl.so libsdxl.dylib sdxl.dll sdxl.dll.lib; do \
	  if [ -f $(TARGET_DIR)/$(PROFILE_DIR)/$$f ]; then cp $(TARGET_DIR)/$(PROFILE_DIR)/$$f dist/lib/; fi; \
	done

example: dist
	$(CC) -std=c11 -O2 -Wall -Wextra -Wpedantic -Idist/include examples/c/generate.c \
	  dist/lib/libsdxl.a $(SYSLIBS) -o dist/generate

header:
	SDXL_BLESS_HEADER=1 $(CARGO) test -p sdxl-ffi --test header

c-tests:
	$(CARGO) test -p sdxl-ffi --test c_programs --test parity $(PROFILE_FLAG)

clean-dist:
	rm -rf dist
