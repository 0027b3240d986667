# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := ffmpeg sox libsox-fmt-all espeak-ng sip-tester baresip chromium multimon-ng lame stress-ng \
  postgresql kamailio \
  python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0 gir1.2-nice-0.1 \
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-loaded bench debian-deps venv clean seaweedfs fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian tools the tests drive (SIPp, baresip, ffmpeg/ffprobe, sox, espeak-ng, Chromium,
# PostgreSQL and Kamailio for cluster mode, and
# GStreamer's webrtcbin as a WHIP client, run by the system Python through python3-gi).
debian-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

run: venv
	$(VENV)/bin/mediaserver serve

test: venv debian-deps
	$(PY) -m pytest

# The whole suite while stress-ng holds one core busy: what passes here passes on a busy
# machine. The trap stops stress-ng however pytest ends; make sees pytest's exit status.
test-loaded: venv debian-deps
	@stress-ng --cpu 1 --quiet & load=$$!; \
	trap 'kill $$load 2>/dev/null; wait $$load 2>/dev/null' EXIT INT TERM; \
	$(PY) -m pytest

bench: venv debian-deps
	$(PY) -m benchmarks

# 10,000 malformed inputs per family (HTTP, auth, SIP, RTP, WebSocket) against a real
# server process; a table per family, non-zero exit on any 5xx, crash or logged ERROR.
fuzz: venv
	$(PY) -m mediaserver.tools.fuzz

# A local SeaweedFS S3 endpoint for trying the S3 backend by hand (see README).
seaweedfs: venv
	$(PY) -m mediaserver.tools.seaweedfs

clean:
	rm -rf $(VENV) data .pytest_cache
