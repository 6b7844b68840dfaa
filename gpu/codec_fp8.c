/* NOTE FOR THE IMPLEMENTER (remove this line block when done): read /tmp/codec_brief.md first —
 * it has the rules (files you may edit, your own build dir /tmp/build-<you>, no git commits). */
/* `fp8` (quantizers.md): CPU reference. Not implemented yet: the registry does not offer
 * a codec whose ops table has no encoder. */
#include "gpu/codec_int.h"

const kvs_codec_ops kvs__codec_fp8_ops = {
    .family = "fp8",
};
