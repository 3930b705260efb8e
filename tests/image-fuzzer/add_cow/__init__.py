# SPDX-License-Identifier: GPL-2.0-or-later
from .layout import create_image, image_format
