/* Symbol visibility for libtokenfuse. The library is built with -fvisibility=hidden;
 * only declarations marked TOKENFUSE_EXPORT are part of its ABI. */
#ifndef TOKENFUSE_EXPORT_H_
#define TOKENFUSE_EXPORT_H_

#if defined(TOKENFUSE_STATIC)
#define TOKENFUSE_EXPORT
#else
#define TOKENFUSE_EXPORT __attribute__((visibility("default")))
#endif

#endif /* TOKENFUSE_EXPORT_H_ */
