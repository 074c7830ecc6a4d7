"""The models: the RGB CLIP (teacher and baseline), the splat image tower and the splat CLIP."""
