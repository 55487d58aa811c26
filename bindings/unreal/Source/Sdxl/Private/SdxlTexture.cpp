#include "SdxlTexture.h"

#include "Engine/Texture2D.h"
#include "Rendering/Texture2DResource.h"

UTexture2D* Sdxl::CreateTexture(const uint8* Rgba, int32 Width, int32 Height)
{
	check(IsInGameThread());
	if (Rgba == nullptr || Width <= 0 || Height <= 0)
	{
		return nullptr;
	}
	UTexture2D* Texture = UTexture2D::CreateTransient(Width, Height, PF_R8G8B8A8);
	if (Texture == nullptr)
	{
		return nullptr;
	}
	Texture->SRGB = true;  // the VAE's output is sRGB-encoded 8-bit colour
	FTexture2DMipMap& Mip = Texture->GetPlatformData()->Mips[0];
	void* Data = Mip.BulkData.Lock(LOCK_READ_WRITE);
	FMemory::Memcpy(Data, Rgba, static_cast<SIZE_T>(Width) * Height * 4);
	Mip.BulkData.Unlock();
	Texture->UpdateResource();
	return Texture;
}
