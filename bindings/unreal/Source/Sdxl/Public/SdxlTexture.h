// RGBA8 results of libsdxl (rows top to bottom, as Unreal expects) -> UTexture2D.
#pragma once

#include "CoreMinimal.h"

class UTexture2D;

namespace Sdxl
{
	/**
	 * A transient texture holding one RGBA8 image (Width * Height * 4 bytes at Rgba). Call on
	 * the game thread; returns nullptr for a bad size.
	 *
	 *   auto Image = Model.generate(Params);              // sdxl::Result<sdxl::Image>
	 *   if (Image) Texture = Sdxl::CreateTexture(Image.value().rgba.data(), W, H);
	 */
	SDXL_API UTexture2D* CreateTexture(const uint8* Rgba, int32 Width, int32 Height);
}
