# CMake package of the installed C client: find_package(kvstash) gives kvstash::kvstash (the
# shared library) and kvstash::kvstash_static (the archive; it needs grpc, protobuf-c and
# xxhash, found here through pkg-config, and glibc's libresolv for the sharded client's DNS).
get_filename_component(_kvs_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
include(GNUInstallDirs)
set(_kvs_inc "${_kvs_prefix}/${CMAKE_INSTALL_INCLUDEDIR}/kvstash")
set(_kvs_lib "${_kvs_prefix}/${CMAKE_INSTALL_LIBDIR}")
if(NOT TARGET kvstash::kvstash)
  add_library(kvstash::kvstash SHARED IMPORTED)
  set_target_properties(kvstash::kvstash PROPERTIES
    IMPORTED_LOCATION "${_kvs_lib}/libkvstash.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_kvs_inc}")
  find_package(PkgConfig REQUIRED)
  pkg_check_modules(_KVS_DEPS REQUIRED IMPORTED_TARGET grpc libprotobuf-c libxxhash)
  add_library(kvstash::kvstash_static STATIC IMPORTED)
  set_target_properties(kvstash::kvstash_static PROPERTIES
    IMPORTED_LOCATION "${_kvs_lib}/libkvstash.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_kvs_inc}"
    INTERFACE_LINK_LIBRARIES "PkgConfig::_KVS_DEPS;m;pthread;resolv")
endif()
set(kvstash_FOUND TRUE)
