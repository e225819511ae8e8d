"""What the tests share: roots and demo configs, real daemon processes, weight writers for the
upscaler tests, an original-layout SDXL checkpoint writer, the disk-fault site hook, and the small
programs some tests run as separate processes."""
