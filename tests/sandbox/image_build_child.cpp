// image_build_child: the victim of image_test's "killed build" case. Builds one image and prints
// every progress line, flushed, so the test can SIGKILL it in the middle of debootstrap (as if
// ferryctl were killed) and then check what is left.
//
//   image_build_child <images-dir> [package…]
//
// Exit status: 0 built, 3 the build failed (message on stderr).
#include <stdio.h>

#include <string>

#include "ferry/sandbox/image.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: image_build_child <images-dir> [package…]\n");
    return 2;
  }
  ferry::sandbox::image_recipe recipe;
  for (int i = 2; i < argc; ++i)
    recipe.packages.push_back(argv[i]);
  ferry::sandbox::image_build_options opts;
  opts.images_dir = argv[1];
  opts.progress = [](std::string_view line) {
    fprintf(stdout, "%.*s\n", static_cast<int>(line.size()), line.data());
    fflush(stdout);
  };
  auto built = ferry::sandbox::build_image(recipe, opts);
  if (!built) {
    fprintf(stderr, "image_build_child: %s\n", built.error().message.c_str());
    return 3;
  }
  return 0;
}
