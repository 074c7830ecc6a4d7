"""Reading and writing data: Fashion-MNIST, captions, photos, images, image-text and splat shards."""
